//! `flush_pending` agrees with `take_flush`.

use hv_altp2m::Altp2m;
use hv_ept::sim::SimMemory;
use hv_ept::{EptCaps, Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

#[test]
fn flush_pending_says_whether_take_flush_has_work() {
    let mut mem = SimMemory::new();
    let mut host = P2m::new(&mut mem, EptCaps::ALL).unwrap();
    let mut alt = Altp2m::new(&mut mem, 1, 16).unwrap();
    host.set_entry(
        &mut mem,
        Gfn(0x100),
        Mfn(0x5000),
        Order::PAGE_4K,
        P2mType::RamRw,
        P2mAccess::Rwx,
    )
    .unwrap();
    assert!(!alt.flush_pending(&host), "adding a mapping needs no flush");
    alt.enable(&mut mem, &host).unwrap();
    let v = alt.create_view(&mut mem, &host, P2mAccess::Rwx).unwrap();
    alt.set_mem_access(&mut mem, &mut host, v, Gfn(0x100), P2mAccess::R)
        .unwrap();
    assert!(alt.flush_pending(&host) || alt.take_flush(&mut host).is_empty());
    let _ = alt.take_flush(&mut host);
    assert!(!alt.flush_pending(&host));
    alt.set_mem_access(&mut mem, &mut host, v, Gfn(0x100), P2mAccess::Rwx)
        .unwrap();
    alt.set_mem_access(&mut mem, &mut host, v, Gfn(0x100), P2mAccess::N)
        .unwrap();
    assert!(alt.flush_pending(&host), "rights taken away in a view");
    assert!(!alt.take_flush(&mut host).is_empty());
    alt.switch_all(0).unwrap();
    alt.disable(&mut mem).unwrap();
    assert!(
        alt.flush_pending(&host),
        "destroyed views need an all-context flush"
    );
    assert!(alt.take_flush(&mut host).all_contexts);
    assert!(!alt.flush_pending(&host));
    alt.destroy(&mut mem);
    host.destroy(&mut mem);
}
