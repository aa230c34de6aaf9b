# shellcheck shell=bash
# shellcheck disable=SC2034  # UNIT_DIR, SHIFT_BY, SEEDED are used by the sourcing scripts
# Shared by install-agent.sh, install-controller.sh and uninstall.sh (sourced, not run).
#
# Every change to the system goes through `run` or one of the helpers below, so that
# --dry-run prints the plan and changes nothing, and --root DIR installs into a scratch root
# (CI): users are created in DIR/etc/passwd, units enabled with `systemctl --root`, nothing is
# started and the host is left alone.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/soundedge            # the virtual environment and the docs
VENV="$PREFIX/venv"
CONF_DIR=/etc/soundedge
UNIT_DIR=/etc/systemd/system
ROOT=""                          # --root: scratch root ("" = the real system)
DRY_RUN=0

say() { printf '%s\n' "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# Run a command that changes the system (printed with a leading +).
run() {
  { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2  # shell-quoted: can be copied and run
  if [[ $DRY_RUN == 0 ]]; then
    "$@"
  fi
}

# The path of a system path inside the root being installed into.
in_root() { printf '%s%s' "$ROOT" "$1"; }

parse_common_option() {
  # Returns 0 and sets SHIFT_BY if $1 is a common option; 1 otherwise.
  case "$1" in
    --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
    --root)
      [[ $# -ge 2 && -n "$2" ]] || die "--root needs a directory"
      ROOT="$(realpath -m "$2")"
      [[ "$ROOT" != / ]] || ROOT=""
      SHIFT_BY=2 ;;
    *) return 1 ;;
  esac
}

require_privileges() {
  if [[ -z "$ROOT" && $DRY_RUN == 0 && $(id -u) -ne 0 ]]; then
    die "run as root (sudo $0 ...), or try --dry-run first"
  fi
  if [[ -z "$ROOT" && $DRY_RUN == 0 ]] && ! command -v systemctl >/dev/null; then
    die "systemctl not found: this script installs a systemd service (see docs/windows.md for Windows)"
  fi
}

apt_install() {
  if [[ -n "$ROOT" || "${SOUNDEDGE_SKIP_APT:-0}" == 1 ]]; then
    say "skipping system packages ($*): scratch root or SOUNDEDGE_SKIP_APT=1"
    return
  fi
  local missing=() pkg
  for pkg in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

user_exists() { grep -q "^$1:" "$(in_root /etc/passwd)" 2>/dev/null; }
group_exists() { grep -q "^$1:" "$(in_root /etc/group)" 2>/dev/null; }
# Numeric gid of a group in the root (the host may not know the root's groups).
group_id() { awk -F: -v g="$1" '$1 == g { print $3 }' "$(in_root /etc/group)"; }

# ensure_user NAME HOME [EXTRA_GROUP]: a system user with its own group, no login, no home.
ensure_user() {
  local name=$1 home=$2 extra=${3:-} root_opt=()
  [[ -n "$ROOT" ]] && root_opt=(--prefix "$ROOT")
  if [[ -n "$ROOT" && ! -f "$(in_root /etc/passwd)" ]]; then
    die "--root $ROOT has no etc/passwd: copy the target's /etc/{passwd,group,shadow,gshadow} there"
  fi
  if [[ -n "$extra" ]] && ! group_exists "$extra"; then
    run groupadd "${root_opt[@]}" --system "$extra"
  fi
  if user_exists "$name"; then
    say "user $name exists"
    if [[ -n "$extra" ]] && ! grep -q "^$extra:.*[:,]$name\(,\|$\)" "$(in_root /etc/group)"; then
      run usermod "${root_opt[@]}" --append --groups "$extra" "$name"
    fi
    return
  fi
  local groups=()
  [[ -n "$extra" ]] && groups=(--groups "$extra")
  run useradd "${root_opt[@]}" --system --user-group --home-dir "$home" --no-create-home \
    --shell /usr/sbin/nologin --comment "soundedge service" "${groups[@]}" "$name"
}

# ensure_venv: the virtual environment under $PREFIX with the package installed (upgraded).
# PACKAGE (default: this checkout), PIP_ARGS and VENV_ARGS come from the options.
ensure_venv() {
  local venv python
  venv="$(in_root "$VENV")"
  python="${PYTHON:-python3}"
  if [[ ! -x "$venv/bin/python" ]]; then
    run mkdir -p "$(in_root "$PREFIX")"
    # shellcheck disable=SC2086  # VENV_ARGS is a list of options
    run "$python" -m venv ${VENV_ARGS:-} "$venv"
  else
    say "virtual environment $VENV exists"
  fi
  local package=${PACKAGE:-} stage=""
  if [[ -z "$package" ]]; then
    # pip builds a local directory in place (build/, *.egg-info): build a copy instead, so
    # that your checkout gets no root-owned files.
    if [[ $DRY_RUN == 1 ]]; then
      stage="${TMPDIR:-/tmp}/tmp.XXXXXXXXXX"
    else
      stage="$(mktemp -d)"
    fi
    package="$stage/soundedge"
    run mkdir -p "$package"
    run cp -r "$REPO/pyproject.toml" "$REPO/edge" "$REPO/controller" "$package/"
    [[ -f "$REPO/README.md" ]] && run cp "$REPO/README.md" "$package/"
  fi
  # shellcheck disable=SC2086  # PIP_ARGS is a list of options
  run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
    ${PIP_ARGS:-} "$package"
  if [[ -n "$stage" && $DRY_RUN == 0 ]]; then
    rm -rf "$stage"
  fi
  # The docs the units point to (Documentation=file://...).
  run mkdir -p "$(in_root "$PREFIX/docs")"
  run cp -r "$REPO/docs/." "$(in_root "$PREFIX/docs")/"
}

# install_file SRC DEST MODE: copy (replacing) a file the project owns, e.g. a unit.
install_file() {
  run install -D -m "$3" "$1" "$(in_root "$2")"
}

# seed_env_file EXAMPLE DEST GROUP NAME=VALUE...: create DEST from EXAMPLE once, with the given
# variables uncommented and set. An existing DEST is never changed (your settings stay).
seed_env_file() {
  local example=$1 dest=$2 group=$3 target
  shift 3
  target="$(in_root "$dest")"
  run install -d -m 0755 "$(in_root "$CONF_DIR")"
  install_file "$example" "$CONF_DIR/$(basename "$example")" 0644
  if [[ -e "$target" ]]; then
    say "kept your $dest (the example with every variable: $CONF_DIR/$(basename "$example"))"
    SEEDED=0
    return
  fi
  say "+ write $dest (mode 0640, group $group) from $(basename "$example")"
  if [[ $DRY_RUN == 1 ]]; then
    SEEDED=1
    return
  fi
  local tmp
  tmp="$(mktemp "$target.XXXXXX")"
  # Values arrive through the environment (awk ENVIRON): no quoting pitfalls.
  # shellcheck disable=SC2016  # the single quotes hold an awk program
  env "$@" awk -v names="$(printf '%s\n' "$@" | cut -d= -f1 | paste -sd' ')" '
    BEGIN { n = split(names, list, " "); for (i = 1; i <= n; i++) want[list[i]] = 1 }
    {
      if (match($0, /^#[A-Z0-9_]+=/)) {
        name = substr($0, 2, RLENGTH - 2)
        if (name in want) { print name "=" ENVIRON[name]; done[name] = 1; next }
      }
      print
    }
    END { for (name in want) if (!(name in done)) print name "=" ENVIRON[name] }
  ' "$example" >"$tmp"
  chmod 0640 "$tmp"
  if [[ -n "$ROOT" ]]; then
    chgrp "$(group_id "$group")" "$tmp"
  else
    chgrp "$group" "$tmp"
  fi
  mv "$tmp" "$target"
  SEEDED=1
}

# enable_unit NAME START: reload systemd, enable, and (unless START=0) (re)start the unit.
enable_unit() {
  local unit=$1 start=$2
  if [[ -n "$ROOT" ]]; then
    run systemctl --root="$ROOT" enable "$unit"
    return
  fi
  run systemctl daemon-reload
  run systemctl enable "$unit"
  if [[ $start == 1 ]]; then
    # restart: an upgrade takes effect; the unit waits for READY=1 (Type=notify).
    run systemctl restart "$unit"
  fi
}

random_secret() {
  # 24 random bytes, letters and digits only (safe in env files, URLs and shells).
  head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32
}

sanitize_id() {
  local id
  id="$(printf '%s' "$1" | cut -d. -f1 | tr -c 'A-Za-z0-9_-' '-' | sed 's/^[-_]*//; s/[-_]*$//')"
  printf '%s' "${id:-soundedge}" | cut -c1-64
}
