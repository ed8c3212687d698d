// Command iapd-bed lets a person try iapd on real interfaces without
// writing namespace code. It builds the network namespaces of iapd's
// end-to-end tests (a host namespace joined to uplinks wifi and cell, each
// with its own DNS and web server), starts iapd in the host namespace with
// a ready policy, prints what to type in other terminals, and on Ctrl-C
// removes everything again. It needs root; run it through "make bed".
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"iapd/internal/netnstest"
	"iapd/internal/testbed"
)

// policy is what iapd serves in the bed: browser prefers wifi and fails
// over to cell, which a short probe and hold-down make quick to watch;
// mms always goes out through cell.
const policy = `listeners:
  - listen: "127.0.0.1:1080"
    protocol: socks5
    app: browser
  - listen: "127.0.0.1:1081"
    protocol: socks5
    app: mms
apps:
  browser: {destination: internet}
  mms: {access_point: cell}
access_points:
  wifi:
    interface: wifi
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
    probe: {http: "http://203.0.113.10/", interval: 1s, timeout: 500ms, failures: 2, successes: 1}
  cell:
    interface: cell
    dns: [203.0.113.53]
    gateway: [192.0.2.1, "2001:db8:1::1"]
    probe: {http: "http://203.0.113.10/", interval: 1s, timeout: 500ms, failures: 2, successes: 1}
destinations:
  internet:
    access_points: [wifi, cell]
    hold_down: 5s
control:
  http: 127.0.0.1:9180
`

// session is a bed with iapd running in it.
type session struct {
	bed  *testbed.Bed
	iapd *testbed.Iapd
	bin  string
}

// setUp builds the bed and starts bin in it, as "iapd run" with policy.
// Everything it makes is removed in t's cleanup.
func setUp(t testing.TB, bin string) *session {
	t.Helper()
	netnstest.Require(t)
	b := testbed.New(t, testbed.Options{BackupDefaults: true})
	d := b.StartWith(t, policy, testbed.StartOptions{Binary: bin, Detach: true})
	return &session{bed: b, iapd: d, bin: bin}
}

// instructions tells what to type in other terminals.
func (s *session) instructions(w io.Writer) {
	host := s.bed.Host.Name
	fmt.Fprintf(w, `iapd runs in network namespace %[1]s, with uplinks wifi (preferred) and cell.
Policy: %[2]s
Each uplink's DNS server answers for www.<uplink>.test, v6.<uplink>.test and both.test;
its web server answers "uplink=<uplink> client=<address>".

In another terminal, as root:

  # browser (SOCKS5 127.0.0.1:1080) goes through wifi, cell when wifi fails
  ip netns exec %[1]s curl --socks5-hostname 127.0.0.1:1080 http://www.wifi.test/
  ip netns exec %[1]s curl --socks5-hostname 127.0.0.1:1080 http://both.test/
  # mms (SOCKS5 127.0.0.1:1081) always goes through cell
  ip netns exec %[1]s curl --socks5-hostname 127.0.0.1:1081 http://both.test/

  # watch iapd's events, its status and the status page
  ip netns exec %[1]s %[3]s events -socket %[4]s
  ip netns exec %[1]s %[3]s status -socket %[4]s
  ip netns exec %[1]s curl http://127.0.0.1:9180/

  # take wifi down (browser fails over to cell) and up again (back to
  # wifi after the 5s hold-down)
  ip -n %[1]s link set wifi down
  ip -n %[1]s link set wifi up

Press Ctrl-C here to stop iapd and remove the namespaces.
`, host, s.iapd.PolicyPath, s.bin, s.iapd.Socket)
}

func main() {
	os.Exit(run())
}

func run() int {
	bin := flag.String("iapd", "bin/iapd", "iapd executable to run in the bed")
	verbose := flag.Bool("v", false, "print iapd's log and the bed's messages")
	flag.Parse()
	if abs, err := filepath.Abs(*bin); err == nil {
		*bin = abs
	}
	if _, err := os.Stat(*bin); err != nil {
		fmt.Fprintf(os.Stderr, "iapd-bed: %v (run make build first)\n", err)
		return 2
	}

	// Ctrl-C before the bed is up still reaches the cleanup below.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	log := io.Discard
	if *verbose {
		log = os.Stderr
	}
	p := testbed.NewProcess("iapd-bed", log)
	code := 0
	var s *session
	if err := p.Run(func() { s = setUp(p, *bin) }); err != nil {
		fmt.Fprintf(os.Stderr, "iapd-bed: %v\n", err)
		code = 1
	} else {
		s.instructions(os.Stdout)
		select {
		case <-ctx.Done():
			fmt.Println("\nstopping iapd and removing the namespaces")
		case <-s.iapd.Exited():
			fmt.Fprintf(os.Stderr, "iapd-bed: iapd exited; its last log lines:\n%s\n", lastLines(s.iapd.Logs(), 20))
			code = 1
		}
	}
	if err := p.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "iapd-bed: cleaning up: %v\n", err)
		code = 1
	}
	return code
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
