#!/usr/bin/env bash
# Install (or upgrade) the soundedge controller as a systemd service on a Linux PC. Idempotent:
# run it again after `git pull` to upgrade; your /etc/soundedge/controller.env is kept.
#
#   sudo scripts/install-controller.sh --mqtt-host broker.lan --mqtt-password PW
#
# What it does: creates the system user `soundedge-controller`, a virtual environment in
# /opt/soundedge/venv with this checkout in it, /etc/soundedge/controller.env seeded with the
# broker and a websocket token for the agents (first run only), and the unit
# soundedge-controller.service (enabled and started); the archive is
# /var/lib/soundedge-controller/archive. Undo with scripts/uninstall.sh.
set -euo pipefail
# shellcheck source=scripts/install-common.sh
source "$(dirname "$0")/install-common.sh"

usage() {
  cat <<EOF
usage: $(basename "$0") [options]

  --mqtt-host HOST     the Mosquitto broker (default: localhost)
  --mqtt-port PORT     (default: 1883)
  --mqtt-username U    the controller's broker user (default: controller, as in mosquitto/acl)
  --mqtt-password PW   its password (default: generated; the command that adds it to the
                       broker is printed)
  --ws-token TOKEN     the token the controller presents to every agent (default: generated;
                       install the agents with --ws-token TOKEN)
  --package SPEC       what pip installs (default: this checkout, $REPO)
  --pip-args ARGS      extra pip arguments, e.g. "--no-deps --no-build-isolation"
  --system-site-packages  let the virtual environment see system Python packages
  --no-start           install and enable, but do not (re)start the service
  --root DIR           install into the scratch root DIR (tests; nothing is started)
  --dry-run            print what would be done and change nothing
  -h, --help           this help

Seeded values are used only when /etc/soundedge/controller.env does not exist yet.
EOF
}

MQTT_HOST=localhost
MQTT_PORT=1883
MQTT_USERNAME=controller
MQTT_PASSWORD=""
WS_TOKEN=""
START=1
PACKAGE=""
PIP_ARGS=""
VENV_ARGS=""
while [[ $# -gt 0 ]]; do
  if parse_common_option "$@"; then
    shift "$SHIFT_BY"
    continue
  fi
  case "$1" in
    --mqtt-host) MQTT_HOST=${2:?--mqtt-host needs a value}; shift 2 ;;
    --mqtt-port) MQTT_PORT=${2:?--mqtt-port needs a value}; shift 2 ;;
    --mqtt-username) MQTT_USERNAME=${2:?--mqtt-username needs a value}; shift 2 ;;
    --mqtt-password) MQTT_PASSWORD=${2:?--mqtt-password needs a value}; shift 2 ;;
    --ws-token) WS_TOKEN=${2:?--ws-token needs a value}; shift 2 ;;
    --package) PACKAGE=${2:?--package needs a value}; shift 2 ;;
    --pip-args) PIP_ARGS=${2?--pip-args needs a value}; shift 2 ;;
    --system-site-packages) VENV_ARGS="--system-site-packages"; shift ;;
    --no-start) START=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

[[ "$MQTT_PORT" =~ ^[0-9]+$ ]] || die "--mqtt-port '$MQTT_PORT' is not a port number"
MQTT_PASSWORD=${MQTT_PASSWORD:-$(random_secret)}
WS_TOKEN=${WS_TOKEN:-$(random_secret)}
require_privileges

say "== soundedge controller${ROOT:+ into $ROOT}$([[ $DRY_RUN == 1 ]] && echo ' (dry run)')"
apt_install python3 python3-venv libsndfile1
ensure_user soundedge-controller /var/lib/soundedge-controller
ensure_venv
seed_env_file "$REPO/systemd/controller.env.example" "$CONF_DIR/controller.env" \
  soundedge-controller \
  "SOUNDEDGE_CONTROLLER_MQTT__HOST=$MQTT_HOST" \
  "SOUNDEDGE_CONTROLLER_MQTT__PORT=$MQTT_PORT" \
  "SOUNDEDGE_CONTROLLER_MQTT__USERNAME=$MQTT_USERNAME" \
  "SOUNDEDGE_CONTROLLER_MQTT__PASSWORD=$MQTT_PASSWORD" \
  "SOUNDEDGE_CONTROLLER_WS_TOKEN=$WS_TOKEN"
install_file "$REPO/systemd/soundedge-controller.service" \
  "$UNIT_DIR/soundedge-controller.service" 0644
enable_unit soundedge-controller.service "$START"

if [[ $SEEDED == 1 ]]; then
  cat >&2 <<EOF

The controller's settings are in $CONF_DIR/controller.env. Next:
  1. On the broker host, in the soundedge checkout, give the controller its broker login:
       sudo SOUNDEDGE_DEVICE_PASSWORD='$MQTT_PASSWORD' mosquitto/add-device.sh $MQTT_USERNAME
  2. Install each agent with this websocket token:
       sudo scripts/install-agent.sh --mqtt-host $MQTT_HOST --ws-token '$WS_TOKEN'
EOF
fi
cat >&2 <<EOF

Check it:   systemctl status soundedge-controller   journalctl -u soundedge-controller -f
Archive:    /var/lib/soundedge-controller/archive
Remove it:  sudo scripts/uninstall.sh --controller  (add --purge to delete settings and archive)
EOF
