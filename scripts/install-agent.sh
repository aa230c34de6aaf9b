#!/usr/bin/env bash
# Install (or upgrade) the soundedge edge agent as a systemd service. Idempotent: run it again
# after `git pull` to upgrade; your /etc/soundedge/agent.env is kept.
#
#   sudo scripts/install-agent.sh --device-id pi-kitchen --mqtt-host broker.lan --ws-token TOKEN
#
# What it does: installs PortAudio and libsndfile (apt), creates the system user `soundedge`
# (in group `audio`), a virtual environment in /opt/soundedge/venv with this checkout in it,
# /etc/soundedge/agent.env seeded with the device id and credentials (first run only), and
# the unit soundedge-agent.service (enabled and started). Undo with scripts/uninstall.sh.
set -euo pipefail
# shellcheck source=scripts/install-common.sh
source "$(dirname "$0")/install-common.sh"

usage() {
  cat <<EOF
usage: $(basename "$0") [options]

  --device-id ID       this agent's id in topics and file names (default: the host name)
  --mqtt-host HOST     the Mosquitto broker (default: localhost)
  --mqtt-port PORT     (default: 1883)
  --mqtt-password PW   the broker password of this device (default: generated; the
                       command that adds it to the broker is printed)
  --ws-token TOKEN     the token controllers present (default: generated and printed;
                       pass the controller's SOUNDEDGE_CONTROLLER_WS_TOKEN)
  --audio-device NAME  part of the sound card's name (see \`soundedge devices\`)
  --package SPEC       what pip installs (default: this checkout, $REPO)
  --pip-args ARGS      extra pip arguments, e.g. "--no-deps --no-build-isolation"
  --system-site-packages  let the virtual environment see system Python packages
  --no-start           install and enable, but do not (re)start the service
  --root DIR           install into the scratch root DIR (tests; nothing is started)
  --dry-run            print what would be done and change nothing
  -h, --help           this help

Seeded values are used only when /etc/soundedge/agent.env does not exist yet.
EOF
}

DEVICE_ID=""
MQTT_HOST=localhost
MQTT_PORT=1883
MQTT_PASSWORD=""
WS_TOKEN=""
AUDIO_DEVICE=""
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
    --device-id) DEVICE_ID=${2:?--device-id needs a value}; shift 2 ;;
    --mqtt-host) MQTT_HOST=${2:?--mqtt-host needs a value}; shift 2 ;;
    --mqtt-port) MQTT_PORT=${2:?--mqtt-port needs a value}; shift 2 ;;
    --mqtt-password) MQTT_PASSWORD=${2:?--mqtt-password needs a value}; shift 2 ;;
    --ws-token) WS_TOKEN=${2:?--ws-token needs a value}; shift 2 ;;
    --audio-device) AUDIO_DEVICE=${2:?--audio-device needs a value}; shift 2 ;;
    --package) PACKAGE=${2:?--package needs a value}; shift 2 ;;
    --pip-args) PIP_ARGS=${2?--pip-args needs a value}; shift 2 ;;
    --system-site-packages) VENV_ARGS="--system-site-packages"; shift ;;
    --no-start) START=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

DEVICE_ID=${DEVICE_ID:-$(sanitize_id "$(hostname)")}
if [[ ! "$DEVICE_ID" =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ ]]; then
  die "--device-id '$DEVICE_ID': letters, digits, '-' and '_' only"
fi
[[ "$MQTT_PORT" =~ ^[0-9]+$ ]] || die "--mqtt-port '$MQTT_PORT' is not a port number"
MQTT_PASSWORD=${MQTT_PASSWORD:-$(random_secret)}
WS_TOKEN=${WS_TOKEN:-$(random_secret)}
require_privileges

say "== soundedge agent '$DEVICE_ID'${ROOT:+ into $ROOT}$([[ $DRY_RUN == 1 ]] && echo ' (dry run)')"
apt_install python3 python3-venv libportaudio2 libsndfile1
ensure_user soundedge /var/lib/soundedge audio
ensure_venv
seed=(
  "SOUNDEDGE_DEVICE_ID=$DEVICE_ID"
  "SOUNDEDGE_MQTT__HOST=$MQTT_HOST"
  "SOUNDEDGE_MQTT__PORT=$MQTT_PORT"
  "SOUNDEDGE_MQTT__USERNAME=$DEVICE_ID"
  "SOUNDEDGE_MQTT__PASSWORD=$MQTT_PASSWORD"
  "SOUNDEDGE_WS__TOKEN=$WS_TOKEN"
)
[[ -n "$AUDIO_DEVICE" ]] && seed+=("SOUNDEDGE_AUDIO__DEVICE=$AUDIO_DEVICE")
seed_env_file "$REPO/systemd/agent.env.example" "$CONF_DIR/agent.env" soundedge "${seed[@]}"
install_file "$REPO/systemd/soundedge-agent.service" "$UNIT_DIR/soundedge-agent.service" 0644
enable_unit soundedge-agent.service "$START"

if [[ $SEEDED == 1 ]]; then
  cat >&2 <<EOF

The agent's settings are in $CONF_DIR/agent.env. Two things to do elsewhere:
  1. On the broker host, in the soundedge checkout, give this device its broker login:
       sudo SOUNDEDGE_DEVICE_PASSWORD='$MQTT_PASSWORD' mosquitto/add-device.sh $DEVICE_ID
  2. The controller must know the websocket token of this device: it is the controller's
     SOUNDEDGE_CONTROLLER_WS_TOKEN if you passed --ws-token, otherwise add
       "$DEVICE_ID": "$WS_TOKEN"
     to SOUNDEDGE_CONTROLLER_WS_TOKENS in /etc/soundedge/controller.env.
EOF
fi
cat >&2 <<EOF

Check it:   systemctl status soundedge-agent      journalctl -u soundedge-agent -f
Sound card: sudo -u soundedge /opt/soundedge/venv/bin/soundedge devices
Remove it:  sudo scripts/uninstall.sh --agent  (add --purge to delete settings and data)
EOF
