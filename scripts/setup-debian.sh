#!/bin/sh
# Installs the Debian packages that building iapd needs and, with the
# argument "test", those its tests need too, or with "bench", those the
# benchmark needs. Only missing packages are installed, so a second run
# costs nothing.
#   golang-go   only when no Go toolchain is installed; go.mod then makes
#               it fetch the Go release the module needs
# For tests:
#   iproute2    ip netns, veth pairs, routes and rules for namespace tests
#   curl        the real client in end-to-end tests
#   util-linux  setpriv, to start iapd without capabilities in a test
#   chromium    headless browser for the status page and proxy tests
#   dbus-daemon a private bus for the stand-in systemd-resolved and
#               NetworkManager of the dns: auto tests
#   bind9-dnsutils  dig, the real DNS client of the per-app DNS listener test
#   microsocks  a SOCKS5 proxy in C that the benchmark measures beside iapd
#               (tests and bench); it installs no service
set -eu

need=""
if [ "${1:-}" = test ]; then
	command -v ip >/dev/null 2>&1 || need="$need iproute2"
	command -v curl >/dev/null 2>&1 || need="$need curl"
	command -v setpriv >/dev/null 2>&1 || need="$need util-linux"
	command -v chromium >/dev/null 2>&1 || need="$need chromium"
	command -v dbus-daemon >/dev/null 2>&1 || need="$need dbus-daemon"
	command -v dig >/dev/null 2>&1 || need="$need bind9-dnsutils"
fi
if [ "${1:-}" = test ] || [ "${1:-}" = bench ]; then
	command -v microsocks >/dev/null 2>&1 || need="$need microsocks"
fi
if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	need="$need golang-go ca-certificates"
fi
[ -n "$need" ] || exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "setup: missing packages:$need; install them as root (apt-get install$need)" >&2
	exit 1
fi
echo "setup: installing$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086 # word splitting of the package list is wanted
apt-get install -y -q --no-install-recommends $need
