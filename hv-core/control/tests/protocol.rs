//! The protocol's round trips and the decoder's robustness.
//!
//! Every message type goes through encode -> bytes -> streaming decoder ->
//! typed decode and must come back equal, however the bytes are split and
//! whatever garbage precedes them. Random bytes, truncations, bit flips,
//! forged sizes and unknown ids must never panic the decoder, which must
//! keep finding the good frames that follow.
//!
//! Default runs are short (proptest's 256 cases per property). The long
//! fuzz run of docs/control.md:
//! `PROPTEST_CASES=100000 cargo test -p hv-control --release`.

use hv_control::frame::{self, MAGIC};
use hv_control::*;
use proptest::prelude::*;

/// Decoded data borrows from its frame; test data lives for the whole run.
fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

fn registers() -> impl Strategy<Value = Registers> {
    let segment = (any::<u16>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(selector, base, limit, access)| Segment {
            selector,
            base,
            limit,
            access,
        },
    );
    (
        any::<[u64; 16]>(),
        any::<[u64; 9]>(),
        (any::<u64>(), any::<u16>(), any::<u64>(), any::<u16>()),
        prop::array::uniform6(segment),
    )
        .prop_map(
            |(gprs, v, (gdtr_base, gdtr_limit, idtr_base, idtr_limit), segments)| Registers {
                gprs,
                rip: v[0],
                rflags: v[1],
                cr0: v[2],
                cr2: v[3],
                cr3: v[4],
                cr4: v[5],
                dr7: v[6],
                efer: v[7],
                kernel_gs_base: v[8],
                gdtr_base,
                gdtr_limit,
                idtr_base,
                idtr_limit,
                segments,
            },
        )
}

/// A gpa and a length that stay within one page.
fn page_span() -> impl Strategy<Value = (u64, usize)> {
    (any::<u64>(), 1..=PAGE_SIZE).prop_flat_map(|(gpa, len)| {
        let page = gpa & !(PAGE_SIZE as u64 - 1);
        (0..=PAGE_SIZE - len).prop_map(move |offset| (page + offset as u64, len))
    })
}

fn command() -> impl Strategy<Value = Command<'static>> {
    use Command as C;
    let entries = prop::collection::vec(
        (any::<u64>(), any::<u8>()).prop_map(|(gfn, access)| AccessEntry { gfn, access }),
        1..=MAX_MULTI,
    );
    prop_oneof![
        (any::<u16>(), any::<u32>()).prop_map(|(version, liveness_ms)| C::Hello {
            version,
            liveness_ms
        }),
        Just(C::Bye),
        any::<u64>().prop_map(|nonce| C::Ping { nonce }),
        Just(C::Capabilities),
        Just(C::MemoryMap),
        any::<u32>().prop_map(|classes| C::SetEvents { classes }),
        any::<u16>().prop_map(|vcpu| C::Pause { vcpu }),
        any::<u16>().prop_map(|vcpu| C::Resume { vcpu }),
        any::<u16>().prop_map(|vcpu| C::GetRegisters { vcpu }),
        (any::<u16>(), registers()).prop_map(|(vcpu, regs)| C::SetRegisters { vcpu, regs }),
        (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(vcpu, cr3, gva)| C::Translate {
            vcpu,
            cr3,
            gva
        }),
        page_span().prop_map(|(gpa, len)| C::ReadMemory {
            gpa,
            len: len as u16
        }),
        page_span()
            .prop_flat_map(|(gpa, len)| (Just(gpa), prop::collection::vec(any::<u8>(), len)))
            .prop_map(|(gpa, data)| C::WriteMemory {
                gpa,
                data: leak(data)
            }),
        Just(C::Altp2mGetState),
        any::<bool>().prop_map(|on| C::Altp2mSetState { on }),
        (any::<u16>(), any::<u64>()).prop_map(|(vcpu, gfn)| C::VcpuEnableNotify { vcpu, gfn }),
        any::<u16>().prop_map(|vcpu| C::VcpuDisableNotify { vcpu }),
        any::<u8>().prop_map(|default_access| C::CreateView { default_access }),
        any::<u16>().prop_map(|view| C::DestroyView { view }),
        any::<u16>().prop_map(|view| C::SwitchView { view }),
        (any::<u16>(), any::<u16>()).prop_map(|(vcpu, view)| C::SwitchVcpuView { vcpu, view }),
        any::<u16>().prop_map(|vcpu| C::GetVcpuView { vcpu }),
        (any::<u16>(), any::<u64>(), any::<u8>()).prop_map(|(view, gfn, access)| C::SetMemAccess {
            view,
            gfn,
            access
        }),
        (any::<u16>(), entries).prop_map(|(view, entries)| C::SetMemAccessMulti {
            view,
            entries: List::Items(leak(entries))
        }),
        (any::<u16>(), any::<u64>()).prop_map(|(view, gfn)| C::GetMemAccess { view, gfn }),
        (any::<u16>(), any::<u64>(), any::<u64>()).prop_map(|(view, old_gfn, new_gfn)| {
            C::ChangeGfn {
                view,
                old_gfn,
                new_gfn,
            }
        }),
        (any::<u16>(), any::<u64>(), any::<bool>()).prop_map(|(view, gfn, suppress)| {
            C::SetSuppressVe {
                view,
                gfn,
                suppress,
            }
        }),
        (
            any::<u16>(),
            any::<u64>(),
            0..MAX_MULTI as u64,
            any::<bool>()
        )
            .prop_map(|(view, first, extra, suppress)| {
                let first_gfn = first.min(u64::MAX - extra);
                C::SetSuppressVeMulti {
                    view,
                    first_gfn,
                    last_gfn: first_gfn + extra,
                    suppress,
                }
            }),
        (any::<u16>(), any::<u64>()).prop_map(|(view, gfn)| C::GetSuppressVe { view, gfn }),
        (any::<u16>(), any::<bool>())
            .prop_map(|(view, visible)| C::SetVisibility { view, visible }),
        (any::<u64>(), 1..=MAX_TRACK_PAGES)
            .prop_map(|(first_gfn, pages)| C::LogdirtyStart { first_gfn, pages }),
        (any::<u64>(), 1..=MAX_FETCH_PAGES)
            .prop_map(|(first_gfn, pages)| C::LogdirtyFetch { first_gfn, pages }),
        (any::<u64>(), 1..=MAX_TRACK_PAGES)
            .prop_map(|(first_gfn, pages)| C::LogdirtyStop { first_gfn, pages }),
        Just(C::AllocShadowPage),
        any::<u64>().prop_map(|gfn| C::FreeShadowPage { gfn }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        (-1007..=-1i32).prop_map(|c| ErrorCode::from_code(c).unwrap()),
        any::<i32>()
            .prop_filter("non-zero", |&c| c != 0)
            .prop_map(|c| ErrorCode::from_code(c).unwrap()),
    ]
}

/// A successful body of the shape replies to `id` have.
fn body(id: u16) -> BoxedStrategy<ReplyBody<'static>> {
    use ReplyBody as B;
    match reply_shape(id).expect("a sendable id") {
        Shape::Done => Just(B::Done).boxed(),
        Shape::Hello => (any::<u16>(), any::<u32>())
            .prop_map(|(version, max_payload)| B::Hello {
                version,
                max_payload,
            })
            .boxed(),
        Shape::Pong => any::<u64>().prop_map(|nonce| B::Pong { nonce }).boxed(),
        Shape::Capabilities => (
            (any::<u32>(), any::<u32>(), any::<u16>(), any::<u16>()),
            (any::<u8>(), any::<u32>(), any::<u64>()),
        )
            .prop_map(
                |((features, events, vcpus, max_views), (altp2m_mode, hv_version, ram_bytes))| {
                    B::Capabilities(Capabilities {
                        features,
                        events,
                        vcpus,
                        max_views,
                        altp2m_mode,
                        hv_version,
                        ram_bytes,
                    })
                },
            )
            .boxed(),
        Shape::MemoryMap => prop::collection::vec(
            (any::<u64>(), any::<u64>()).prop_map(|(start, len)| Range { start, len }),
            0..=MAX_RANGES,
        )
        .prop_map(|ranges| B::MemoryMap(List::Items(leak(ranges))))
        .boxed(),
        Shape::Events => any::<u32>()
            .prop_map(|classes| B::Events { classes })
            .boxed(),
        Shape::Registers => registers().prop_map(B::Registers).boxed(),
        Shape::Translation => (any::<u64>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(gpa, page_shift, paging, perms)| {
                B::Translation(Translation {
                    gpa,
                    page_shift,
                    paging,
                    perms,
                })
            })
            .boxed(),
        Shape::Memory => prop::collection::vec(any::<u8>(), 1..=PAGE_SIZE)
            .prop_map(|bytes| B::Memory(leak(bytes)))
            .boxed(),
        Shape::Gfn => any::<u64>().prop_map(B::Gfn).boxed(),
        Shape::Flag => any::<bool>().prop_map(B::Flag).boxed(),
        Shape::View => any::<u16>().prop_map(B::View).boxed(),
        Shape::Access => any::<u8>().prop_map(B::Access).boxed(),
        Shape::Applied => any::<u32>().prop_map(B::Applied).boxed(),
        Shape::Dirty => (
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..=PAGE_SIZE),
        )
            .prop_map(|(dirty, bitmap)| B::Dirty {
                dirty,
                bitmap: leak(bitmap),
            })
            .boxed(),
    }
}

fn reply() -> impl Strategy<Value = (u16, Reply<'static>)> {
    let ids: Vec<u16> = Command::IDS.iter().chain(&Event::IDS).copied().collect();
    prop::sample::select(ids).prop_flat_map(|id| {
        let reply = prop_oneof![
            3 => body(id).prop_map(Ok),
            1 => error_code().prop_map(Err),
        ];
        (Just(id), reply)
    })
}

fn gla() -> impl Strategy<Value = Option<u64>> {
    proptest::option::of(any::<u64>())
}

fn event() -> impl Strategy<Value = Event> {
    let context = (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>()).prop_map(
        |(vcpu, view, rip, cr3)| Context {
            vcpu,
            view,
            rip,
            cr3,
        },
    );
    let access = 0..=access_bits::ALL;
    let kind = prop_oneof![
        (any::<u64>(), gla(), access.clone(), any::<u8>()).prop_map(|(gpa, gla, access, entry)| {
            EventKind::MemAccess {
                gpa,
                gla,
                access,
                entry,
            }
        }),
        (any::<u64>(), any::<u64>()).prop_map(|(gpa, gla)| EventKind::Breakpoint { gpa, gla }),
        (any::<u64>(), any::<u64>()).prop_map(|(old, new)| EventKind::Cr3Write { old, new }),
        Just(EventKind::SingleStep),
        (any::<u64>(), gla(), access).prop_map(|(gpa, gla, access)| EventKind::Ve {
            gpa,
            gla,
            access
        }),
    ];
    (context, kind).prop_map(|(context, kind)| Event { context, kind })
}

fn answer() -> impl Strategy<Value = Answer> {
    (proptest::option::of(any::<u16>()), any::<bool>()).prop_map(|(switch_view, single_step)| {
        Answer {
            switch_view,
            single_step,
        }
    })
}

fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        (any::<u32>(), command()).prop_map(|(seq, command)| Message::Command { seq, command }),
        (any::<u32>(), reply()).prop_map(|(seq, (id, reply))| Message::Reply { id, seq, reply }),
        (any::<u32>(), event()).prop_map(|(seq, event)| Message::Event { seq, event }),
        (
            any::<u32>(),
            prop::sample::select(Event::IDS.to_vec()),
            answer()
        )
            .prop_map(|(seq, id, answer)| Message::Answer { id, seq, answer }),
    ]
}

fn encode(message: &Message<'_>) -> Vec<u8> {
    let mut buf = vec![0; MAX_FRAME];
    let n = message
        .encode(&mut buf)
        .expect("every valid message fits a frame");
    buf.truncate(n);
    buf
}

/// What a decoder makes of `bytes`, pushed one at a time (polling after
/// each result), as owned results: frames re-encoded, errors as they are.
#[derive(Debug, PartialEq)]
enum Seen {
    Frame(Vec<u8>),
    Error(FrameError),
}

/// A decoder result, owned: a frame as its bytes again.
fn seen(d: Decoded<'_>) -> Seen {
    match d {
        Decoded::Frame(f) => {
            let mut buf = vec![0; MAX_FRAME];
            let n = frame::encode(&mut buf, f.kind, f.id, f.seq, |w| w.bytes(f.payload)).unwrap();
            buf.truncate(n);
            Seen::Frame(buf)
        }
        Decoded::Error(e) => Seen::Error(e),
    }
}

fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Vec<Seen> {
    let mut out = Vec::new();
    for &b in bytes {
        if let Some(d) = decoder.push(b) {
            out.push(seen(d));
            while let Some(d) = decoder.poll() {
                out.push(seen(d));
            }
        }
    }
    out
}

/// The same through `feed`, in chunks of `chunk` bytes.
fn feed_all(decoder: &mut Decoder, bytes: &[u8], chunk: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    for mut part in bytes.chunks(chunk) {
        loop {
            let (used, d) = decoder.feed(part);
            part = &part[used..];
            match d {
                Some(d) => out.push(seen(d)),
                None => break,
            }
        }
    }
    out
}

fn frames(seen: &[Seen]) -> Vec<&[u8]> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Frame(f) => Some(f.as_slice()),
            Seen::Error(_) => None,
        })
        .collect()
}

/// Decodes one whole frame's bytes as a typed message.
fn roundtrip(bytes: &[u8]) -> Message<'static> {
    let mut decoder = Decoder::new();
    let seen = decode_all(&mut decoder, bytes);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let Seen::Frame(frame_bytes) = &seen[0] else {
        panic!("{seen:?}")
    };
    assert_eq!(frame_bytes.as_slice(), bytes);
    let bytes = leak(bytes.to_vec());
    let mut decoder = Decoder::new();
    let (used, decoded) = decoder.feed(bytes);
    assert_eq!(used, bytes.len());
    let Some(Decoded::Frame(f)) = decoded else {
        panic!("no frame")
    };
    let f = Frame {
        payload: leak(f.payload.to_vec()),
        ..f
    };
    Message::decode(&f).expect("a message we encoded decodes")
}

proptest! {
    #[test]
    fn every_message_round_trips(message in message()) {
        let bytes = encode(&message);
        prop_assert!(bytes.len() <= MAX_FRAME);
        prop_assert_eq!(roundtrip(&bytes), message);
    }

    #[test]
    fn frames_survive_any_split_and_leading_garbage(
        messages in prop::collection::vec(message(), 1..4),
        garbage in prop::collection::vec(any::<u8>(), 0..64),
        chunk in 1usize..700,
    ) {
        let encoded: Vec<Vec<u8>> = messages.iter().map(encode).collect();
        let mut stream = garbage.clone();
        for e in &encoded {
            stream.extend_from_slice(e);
        }
        let want: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
        let by_byte = decode_all(&mut Decoder::new(), &stream);
        prop_assert_eq!(frames(&by_byte), want.clone());
        let by_chunk = feed_all(&mut Decoder::new(), &stream, chunk);
        prop_assert_eq!(by_byte, by_chunk);
    }

    #[test]
    fn random_bytes_never_panic_and_a_good_frame_after_them_is_found(
        noise in prop::collection::vec(any::<u8>(), 0..6000),
        message in message(),
    ) {
        let good = encode(&message);
        let mut stream = noise;
        stream.extend_from_slice(&good);
        let mut decoder = Decoder::new();
        let seen = decode_all(&mut decoder, &stream);
        prop_assert_eq!(frames(&seen).last().copied(), Some(good.as_slice()));
        prop_assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn a_truncated_frame_does_not_hide_the_next_one(
        first in message(),
        second in message(),
        cut in any::<prop::sample::Index>(),
    ) {
        let first = encode(&first);
        let second = encode(&second);
        let cut = cut.index(first.len());
        // The next frame's first bytes may be exactly the cut ones (an
        // answer whose view ends in 'H', 'V', ...): then the stream holds
        // the whole first frame, and that is what must come out.
        prop_assume!(!second.starts_with(&first[cut..]));
        let mut stream = first[..cut].to_vec();
        stream.extend_from_slice(&second);
        let mut decoder = Decoder::new();
        let mut seen_after = decode_all(&mut decoder, &stream);
        // A cut header's size may promise more bytes than follow: the
        // second frame then comes out when the receiver's idle timeout
        // expires the first.
        if frames(&seen_after).is_empty() {
            prop_assert!(decoder.is_mid_frame());
            if let Some(d) = decoder.expire() {
                seen_after.push(seen(d));
            }
            while let Some(d) = decoder.poll() {
                seen_after.push(seen(d));
            }
        }
        prop_assert_eq!(frames(&seen_after), vec![second.as_slice()]);
        prop_assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn a_bit_flip_is_detected_and_the_next_frame_is_found(
        first in message(),
        second in message(),
        bit in any::<prop::sample::Index>(),
    ) {
        let mut flipped = encode(&first);
        let bit = bit.index(flipped.len() * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        let second = encode(&second);
        let mut stream = flipped.clone();
        stream.extend_from_slice(&second);
        let seen = decode_all(&mut Decoder::new(), &stream);
        // The damaged frame never comes through; the next always does.
        prop_assert_eq!(frames(&seen), vec![second.as_slice()]);
        // A flip in the payload is reported with the header it came with.
        if bit / 8 >= HEADER_LEN {
            prop_assert!(
                matches!(seen.first(), Some(Seen::Error(FrameError::BadPayloadCrc(_)))),
                "{:?}", seen
            );
        }
    }

    #[test]
    fn payloads_of_any_bytes_decode_to_a_message_or_an_error(
        kind in 1u8..=4,
        id in any::<u16>(),
        payload in prop::collection::vec(any::<u8>(), 0..=MAX_PAYLOAD),
    ) {
        let frame = Frame { kind: Kind::from_u8(kind).unwrap(), id, seq: 7, payload: &payload };
        // Whatever it decodes to must encode back to the same bytes.
        if let Ok(message) = Message::decode(&frame) {
            let bytes = encode(&message);
            prop_assert_eq!(&bytes[HEADER_LEN..], payload.as_slice());
        }
    }
}

/// A header for `payload_len` bytes with any kind, version and size fields.
fn forged_header(version: u8, kind: u8, id: u16, seq: u32, len: u32) -> Vec<u8> {
    let mut head = vec![0; HEADER_LEN];
    frame::write_header(&mut head, kind, id, seq, &[]);
    head[4] = version;
    head[12..16].copy_from_slice(&len.to_le_bytes());
    frame::seal_header(&mut head);
    head
}

fn ping(seq: u32) -> Vec<u8> {
    encode(&Message::Command {
        seq,
        command: Command::Ping { nonce: 42 },
    })
}

#[test]
fn trusted_headers_of_frames_that_cannot_be_taken_are_reported() {
    for (head, want) in [
        (
            forged_header(2, 1, id::PING, 5, 8),
            FrameError::BadVersion as fn(_) -> _,
        ),
        (
            forged_header(VERSION, 9, id::PING, 5, 8),
            FrameError::BadKind,
        ),
        (
            forged_header(VERSION, 1, id::PING, 5, MAX_PAYLOAD as u32 + 1),
            FrameError::TooBig,
        ),
        (
            forged_header(VERSION, 1, id::PING, 5, u32::MAX),
            FrameError::TooBig,
        ),
    ] {
        let mut stream = head.clone();
        stream.extend_from_slice(&ping(6));
        let seen = decode_all(&mut Decoder::new(), &stream);
        let header = match &seen[0] {
            Seen::Error(e) => e.header(),
            other => panic!("{other:?}"),
        };
        assert_eq!(seen[0], Seen::Error(want(header)));
        assert_eq!((header.id, header.seq), (id::PING, 5));
        // The good frame after it is not lost.
        assert_eq!(frames(&seen), vec![ping(6).as_slice()]);
    }
}

#[test]
fn errors_carry_the_codes_of_the_specification() {
    let header = match decode_all(&mut Decoder::new(), &forged_header(3, 1, 1, 1, 0))[0] {
        Seen::Error(e) => e.header(),
        _ => unreachable!("version 3 is refused"),
    };
    assert_eq!(FrameError::BadVersion(header).code().code(), -1002);
    assert_eq!(FrameError::TooBig(header).code().code(), -1003);
    assert_eq!(FrameError::BadPayloadCrc(header).code().code(), -1000);
    assert_eq!(FrameError::BadKind(header).code().code(), -1001);
    // Hypercall errors keep hv-abi's numbers.
    assert_eq!(ErrorCode::Inval.code(), hv_abi::error::EINVAL as i32);
    assert_eq!(
        ErrorCode::from_hypercall(hv_abi::error::EBUSY),
        Some(ErrorCode::Busy)
    );
    assert_eq!(ErrorCode::from_hypercall(3), None);
    for code in -1100..=0 {
        match ErrorCode::from_code(code) {
            None => assert_eq!(code, 0),
            Some(e) => assert_eq!(e.code(), code),
        }
    }
}

#[test]
fn unknown_ids_and_bad_shapes_are_told_apart() {
    assert_eq!(Command::decode(0x7f, &[]), Err(DecodeError::Unknown));
    assert_eq!(Event::decode(0x10, &[0; 20]), Err(DecodeError::Unknown));
    assert_eq!(Answer::decode(id::PING, &[0; 3]), Err(DecodeError::Unknown));
    // One byte short, one byte over.
    assert_eq!(
        Command::decode(id::PING, &[0; 7]),
        Err(DecodeError::Malformed)
    );
    assert_eq!(
        Command::decode(id::PING, &[0; 9]),
        Err(DecodeError::Malformed)
    );
    // A flag byte that is neither 0 nor 1.
    assert_eq!(
        Command::decode(id::ALTP2M_SET_STATE, &[2]),
        Err(DecodeError::Malformed)
    );
    // Reserved answer bits, and a view without the switch flag.
    assert_eq!(
        Answer::decode(id::EVENT_BREAKPOINT, &[4, 0, 0]),
        Err(DecodeError::Malformed)
    );
    assert_eq!(
        Answer::decode(id::EVENT_BREAKPOINT, &[0, 1, 0]),
        Err(DecodeError::Malformed)
    );
    assert_eq!(DecodeError::Unknown.code(), ErrorCode::UnknownMessage);
    assert_eq!(DecodeError::Malformed.code(), ErrorCode::BadFrame);
    assert_eq!(DecodeError::Invalid.code(), ErrorCode::Inval);
}

fn gpa_len(gpa: u64, len: u16) -> Vec<u8> {
    let mut p = gpa.to_le_bytes().to_vec();
    p.extend_from_slice(&len.to_le_bytes());
    p
}

#[test]
fn bounds_mirror_the_hypercalls() {
    // Memory access stays within a page and moves at least a byte.
    assert_eq!(
        Command::decode(id::READ_MEMORY, &gpa_len(0x1000, 4096)),
        Ok(Command::ReadMemory {
            gpa: 0x1000,
            len: 4096
        })
    );
    for (gpa, len) in [(0x1001, 4096), (0x1fff, 2), (0x1000, 0), (0x1000, 4097)] {
        assert_eq!(
            Command::decode(id::READ_MEMORY, &gpa_len(gpa, len)),
            Err(DecodeError::Invalid),
            "{gpa:#x}+{len}"
        );
    }
    assert_eq!(
        Command::decode(id::WRITE_MEMORY, &0x2000u64.to_le_bytes()),
        Err(DecodeError::Invalid)
    );
    // Multi calls: 1..=512 entries.
    let multi = |count: u16| {
        let mut p = 1u16.to_le_bytes().to_vec();
        p.extend_from_slice(&count.to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, usize::from(count) * 9));
        Command::decode(id::ALTP2M_SET_MEM_ACCESS_MULTI, leak(p))
    };
    assert!(
        matches!(multi(1), Ok(Command::SetMemAccessMulti { entries, .. }) if entries.len() == 1)
    );
    assert!(multi(512).is_ok());
    assert_eq!(multi(0), Err(DecodeError::Invalid));
    assert_eq!(multi(513), Err(DecodeError::Invalid));
    let suppress = |first: u64, last: u64| {
        let mut p = 1u16.to_le_bytes().to_vec();
        p.extend_from_slice(&first.to_le_bytes());
        p.extend_from_slice(&last.to_le_bytes());
        p.push(1);
        Command::decode(id::ALTP2M_SET_SUPPRESS_VE_MULTI, leak(p))
    };
    assert!(suppress(10, 10 + 511).is_ok());
    assert_eq!(suppress(10, 10 + 512), Err(DecodeError::Invalid));
    assert_eq!(suppress(10, 9), Err(DecodeError::Invalid));
    let pages = |id: u16, pages: u32| {
        let mut p = 0u64.to_le_bytes().to_vec();
        p.extend_from_slice(&pages.to_le_bytes());
        Command::decode(id, leak(p))
    };
    assert!(pages(id::LOGDIRTY_FETCH, MAX_FETCH_PAGES).is_ok());
    assert_eq!(
        pages(id::LOGDIRTY_FETCH, MAX_FETCH_PAGES + 1),
        Err(DecodeError::Invalid)
    );
    assert_eq!(pages(id::LOGDIRTY_START, 0), Err(DecodeError::Invalid));
    assert!(pages(id::LOGDIRTY_STOP, MAX_TRACK_PAGES).is_ok());
}

#[test]
fn the_largest_payloads_fit_one_frame() {
    let data = [0xabu8; PAGE_SIZE];
    let entries = [AccessEntry { gfn: 1, access: 7 }; MAX_MULTI];
    let ranges = [Range { start: 0, len: 1 }; MAX_RANGES];
    let regs = Registers::default();
    for message in [
        Message::Command {
            seq: 1,
            command: Command::WriteMemory {
                gpa: 0x5000,
                data: &data,
            },
        },
        Message::Command {
            seq: 1,
            command: Command::SetMemAccessMulti {
                view: 1,
                entries: List::Items(&entries),
            },
        },
        Message::Command {
            seq: 1,
            command: Command::SetRegisters { vcpu: 0, regs },
        },
        Message::Reply {
            id: id::READ_MEMORY,
            seq: 1,
            reply: Ok(ReplyBody::Memory(&data)),
        },
        Message::Reply {
            id: id::LOGDIRTY_FETCH,
            seq: 1,
            reply: Ok(ReplyBody::Dirty {
                dirty: 3,
                bitmap: &data,
            }),
        },
        Message::Reply {
            id: id::MEMORY_MAP,
            seq: 1,
            reply: Ok(ReplyBody::MemoryMap(List::Items(&ranges))),
        },
    ] {
        assert_eq!(roundtrip(&encode(&message)), message);
    }
    // One entry more does not fit: encoding refuses rather than truncates.
    let too_many = [AccessEntry::default(); MAX_PAYLOAD / 9 + 1];
    let mut buf = [0u8; MAX_FRAME];
    let over = Message::Command {
        seq: 1,
        command: Command::SetMemAccessMulti {
            view: 1,
            entries: List::Items(&too_many),
        },
    };
    assert_eq!(over.encode(&mut buf), Err(Overflow));
}

#[test]
fn a_reply_body_must_fit_its_id() {
    let mut buf = [0u8; MAX_FRAME];
    let wrong = Message::Reply {
        id: id::PING,
        seq: 1,
        reply: Ok(ReplyBody::View(3)),
    };
    assert_eq!(wrong.encode(&mut buf), Err(Overflow));
    // Every id a tool sends or answers has a reply shape; no other does.
    for id in 0..=u16::MAX {
        let known = Command::IDS.contains(&id) || Event::IDS.contains(&id);
        assert_eq!(reply_shape(id).is_some(), known, "{id:#x}");
    }
}

#[test]
fn ids_are_unique_and_mirror_the_hypercalls() {
    let mut all: Vec<u16> = Command::IDS.iter().chain(&Event::IDS).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), Command::IDS.len() + Event::IDS.len());
    assert_eq!(
        u64::from(id::ALTP2M_CHANGE_GFN),
        hv_abi::call::ALTP2M_CHANGE_GFN
    );
    assert_eq!(u64::from(id::LOGDIRTY_FETCH), hv_abi::call::LOGDIRTY_FETCH);
}

#[test]
fn a_frame_byte_by_byte_matches_the_specification() {
    // docs/control.md, "Framing": the worked example.
    let bytes = ping(0x0102_0304);
    assert_eq!(&bytes[..4], &MAGIC);
    assert_eq!(bytes[4], 1, "version");
    assert_eq!(bytes[5], 1, "kind: command");
    assert_eq!(&bytes[6..8], &[0x03, 0x00], "id: PING");
    assert_eq!(&bytes[8..12], &[0x04, 0x03, 0x02, 0x01], "seq");
    assert_eq!(&bytes[12..16], &[8, 0, 0, 0], "payload size");
    assert_eq!(
        &bytes[16..20],
        &frame::crc32(&42u64.to_le_bytes()).to_le_bytes()
    );
    assert_eq!(&bytes[20..24], &frame::crc32(&bytes[..20]).to_le_bytes());
    assert_eq!(&bytes[24..], &42u64.to_le_bytes());
    // CRC-32/ISO-HDLC's check value.
    assert_eq!(frame::crc32(b"123456789"), 0xcbf4_3926);
}

#[test]
fn the_decoder_holds_at_most_one_frame_whatever_it_is_fed() {
    // Worst case for the buffer: maximal frames whose payload CRC fails,
    // back to back, then a good one.
    let mut bad = encode(&Message::Reply {
        id: id::READ_MEMORY,
        seq: 1,
        reply: Ok(ReplyBody::Memory(&[0x48; PAGE_SIZE])),
    });
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut stream = Vec::new();
    for _ in 0..5 {
        stream.extend_from_slice(&bad);
    }
    stream.extend_from_slice(&ping(9));
    let mut decoder = Decoder::new();
    let seen = decode_all(&mut decoder, &stream);
    assert_eq!(frames(&seen), vec![ping(9).as_slice()]);
    assert_eq!(
        seen.iter().filter(|s| matches!(s, Seen::Error(_))).count(),
        5
    );
    assert!(std::mem::size_of::<Decoder>() < MAX_FRAME + 64);
}
