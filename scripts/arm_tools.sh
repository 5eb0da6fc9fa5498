#!/usr/bin/env bash
# qemu's user-mode emulator and the aarch64 cross compilers (Debian packages) for
# tests/test_cross_arm.py; nothing to do when they are on the PATH. Needs root or sudo.
set -euo pipefail
packages=()
command -v qemu-aarch64-static > /dev/null || packages+=(qemu-user-static)
command -v aarch64-linux-gnu-g++ > /dev/null || packages+=(g++-aarch64-linux-gnu)
[ ${#packages[@]} -eq 0 ] && exit 0
command -v apt-get > /dev/null || { echo "arm_tools: no apt-get to install ${packages[*]}" >&2; exit 1; }
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  sudo -n true 2> /dev/null || { echo "arm_tools: installing ${packages[*]} needs root or sudo" >&2; exit 1; }
  sudo_cmd=(sudo -n)
fi
apt_install() { "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}" > /dev/null; }
apt_install || { "${sudo_cmd[@]}" apt-get update -q > /dev/null && apt_install; }
