# Sourced by the other scripts: strict mode, the repository as the working
# directory, and an environment that finds the Rust toolchain whatever the
# caller's (a CI runner, `env -i`, a login without a profile, HOME unset or
# pointing nowhere). Never overrides a RUSTUP_HOME / CARGO_HOME that is set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"
# A locale that does not exist makes every program warn (perl under apt-get
# at length); C.UTF-8 exists on every Debian.
if command -v locale >/dev/null && [ -n "$(locale 2>&1 >/dev/null)" ]; then
    export LC_ALL=C.UTF-8
fi
account_home=$(getent passwd "$(id -u)" | cut -d: -f6) || account_home=""
if [ -z "${HOME:-}" ] || [ ! -d "$HOME" ]; then
    if [ -n "${HOME:-}" ]; then
        echo "${0##*/}: HOME=$HOME does not exist; using the account's home, $account_home" >&2
    fi
    export HOME="$account_home"
fi
# rustup keeps the toolchains in ~/.rustup and cargo its registry in ~/.cargo:
# with HOME elsewhere, the account's own are the ones that exist.
if [ -z "${RUSTUP_HOME:-}" ] && [ ! -d "$HOME/.rustup" ] && [ -d "$account_home/.rustup" ]; then
    export RUSTUP_HOME="$account_home/.rustup"
fi
if [ -z "${CARGO_HOME:-}" ] && [ ! -d "$HOME/.cargo" ] && [ -d "$account_home/.cargo" ]; then
    export CARGO_HOME="$account_home/.cargo"
fi
# Where rustup installs cargo, for shells that did not read rustup's profile line.
command -v cargo >/dev/null || PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
unset account_home

# Prints "== what" and, at the next step or the end, how long the last one took.
step_started=""
step() {
    [ -z "$step_started" ] || printf '   (%d s)\n' $((SECONDS - step_started)) >&2
    step_started=$SECONDS
    [ $# -eq 0 ] || printf '\n== %s\n' "$*" >&2
}
