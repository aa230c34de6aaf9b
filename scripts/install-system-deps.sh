#!/usr/bin/env bash
# System packages soundedge needs on Debian / Raspberry Pi OS (Bookworm).
#   runtime:  libportaudio2 (PortAudio), libsndfile1 (sound files)
#   broker:   mosquitto, mosquitto-clients
#   tests:    pulseaudio + pulseaudio-utils + libasound2-plugins (the virtual microphone),
#             ffmpeg (detector comparison), sox and espeak-ng (test sounds), systemd (unit checks),
#             and the linter for shell scripts (package shellcheck)
# Idempotent; uses sudo when not root. Set SOUNDEDGE_SKIP_APT=1 to skip (packages managed
# elsewhere).
set -euo pipefail

PACKAGES=(
  python3 python3-venv python3-pip
  libportaudio2 libsndfile1
  mosquitto mosquitto-clients
  pulseaudio pulseaudio-utils libasound2-plugins alsa-utils
  ffmpeg sox espeak-ng
  systemd shellcheck
)

if [[ "${SOUNDEDGE_SKIP_APT:-0}" == "1" ]]; then
  exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  SUDO="sudo"
fi
echo "installing system packages: ${missing[*]}" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
