#!/usr/bin/env bash
# Remove what install-agent.sh / install-controller.sh installed. Idempotent.
#
#   sudo scripts/uninstall.sh                 # both services; keeps settings and recorded data
#   sudo scripts/uninstall.sh --agent --purge # the agent, its settings, data and user too
#
# Without --purge, /etc/soundedge/*.env and /var/lib/soundedge* (events, archive) stay, so a
# later install picks up where you left off. The virtual environment /opt/soundedge goes when
# no soundedge service is left.
set -euo pipefail
# shellcheck source=scripts/install-common.sh
source "$(dirname "$0")/install-common.sh"

usage() {
  cat <<EOF
usage: $(basename "$0") [--agent] [--controller] [--purge] [--root DIR] [--dry-run]

  --agent        remove the agent (soundedge-agent.service)
  --controller   remove the controller (soundedge-controller.service)
                 (neither: both)
  --purge        also delete settings (/etc/soundedge/...), data (/var/lib/...) and the users
  --root DIR     uninstall from the scratch root DIR (tests)
  --dry-run      print what would be done and change nothing
EOF
}

AGENT=0
CONTROLLER=0
PURGE=0
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --agent) AGENT=1; shift ;;
    --controller) CONTROLLER=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
if [[ $AGENT == 0 && $CONTROLLER == 0 ]]; then
  AGENT=1
  CONTROLLER=1
fi
require_privileges

remove_service() {
  local unit=$1 user=$2 env_file=$3 state_dir=$4
  if [[ -e "$(in_root "$UNIT_DIR/$unit")" ]]; then
    if [[ -n "$ROOT" ]]; then
      run systemctl --root="$ROOT" disable "$unit"
    else
      # Stopping lets the service finish the file it is writing (TimeoutStopSec).
      run systemctl disable --now "$unit"
    fi
    run rm -f "$(in_root "$UNIT_DIR/$unit")"
    run rm -rf "$(in_root "$UNIT_DIR/$unit.d")"
    [[ -z "$ROOT" ]] && run systemctl daemon-reload
  else
    say "$unit is not installed"
  fi
  if [[ $PURGE == 1 ]]; then
    run rm -f "$(in_root "$env_file")" "$(in_root "$env_file.example")"
    run rm -rf "$(in_root "$state_dir")"
    if user_exists "$user"; then
      local root_opt=()
      [[ -n "$ROOT" ]] && root_opt=(--prefix "$ROOT")
      run userdel "${root_opt[@]}" "$user"
    fi
  else
    [[ -e "$(in_root "$env_file")" ]] && say "kept $env_file (--purge deletes it)"
    [[ -e "$(in_root "$state_dir")" ]] && say "kept $state_dir (--purge deletes it)"
  fi
  return 0
}

if [[ $AGENT == 1 ]]; then
  remove_service soundedge-agent.service soundedge "$CONF_DIR/agent.env" /var/lib/soundedge
fi
if [[ $CONTROLLER == 1 ]]; then
  remove_service soundedge-controller.service soundedge-controller \
    "$CONF_DIR/controller.env" /var/lib/soundedge-controller
fi

# The shared parts go with the last service.
if [[ ! -e "$(in_root "$UNIT_DIR/soundedge-agent.service")" &&
  ! -e "$(in_root "$UNIT_DIR/soundedge-controller.service")" ]]; then
  if [[ -e "$(in_root "$PREFIX")" ]]; then
    run rm -rf "$(in_root "$PREFIX")"
  fi
  if [[ $PURGE == 1 && -d "$(in_root "$CONF_DIR")" ]]; then
    run rmdir --ignore-fail-on-non-empty "$(in_root "$CONF_DIR")"
  fi
fi
say "done"
