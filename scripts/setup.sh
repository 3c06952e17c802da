#!/usr/bin/env bash
# One-time machine setup for LoraKit. Idempotent: each step checks before it acts.
#
# TorchSharp 0.107's native library needs libstdc++ from GCC 13+ (symbol GLIBCXX_3.4.32). Debian 12 ships
# GCC 12's, so there we take libstdc++6 alone from Debian 13 (trixie), pinned low so nothing else moves.
set -euo pipefail

need_symbol=GLIBCXX_3.4.32

libstdcxx_path() {
  local p
  for p in /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib64/libstdc++.so.6 /usr/lib/libstdc++.so.6; do
    [ -e "$p" ] && { echo "$p"; return; }
  done
  ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 /{print $NF; exit}'
}

has_symbol() {
  local lib; lib=$(libstdcxx_path)
  [ -n "$lib" ] && grep -qa "$need_symbol" "$lib"
}

if has_symbol; then
  exit 0
fi

echo "setup: libstdc++ lacks $need_symbol, which TorchSharp's native library needs." >&2
if ! grep -qs 'VERSION_CODENAME=bookworm' /etc/os-release; then
  echo "setup: this is not Debian 12; install a libstdc++ from GCC 13 or newer with your package manager." >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  sudo_cmd=""
  command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo_cmd="sudo"
  if [ -z "$sudo_cmd" ]; then
    cat >&2 <<MSG
setup: installing it needs root. Run once as root (or with sudo):
  sudo $0
It adds Debian 13 (trixie) as a low-priority apt source and installs only libstdc++6 from it.
MSG
    exit 1
  fi
  exec sudo "$0" "$@"
fi

echo "setup: adding Debian trixie (pinned low) and installing libstdc++6 from it (~15 s)..." >&2
src=/etc/apt/sources.list.d/lorakit-trixie.sources
if [ ! -f "$src" ]; then
  cat > "$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
pin=/etc/apt/preferences.d/lorakit-trixie
if [ ! -f "$pin" ]; then
  printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > "$pin"
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t trixie libstdc++6 >/dev/null
if has_symbol; then
  echo "setup: libstdc++ now provides $need_symbol." >&2
else
  echo "setup: libstdc++6 from trixie was installed but $need_symbol is still missing." >&2
  exit 1
fi
