// Package netnstest builds network namespaces and veth pairs for tests that
// need real interfaces, and runs code inside them. It is for tests only and
// needs root; it never touches the namespace the test process started in
// beyond creating and deleting named namespaces.
package netnstest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Require skips t unless the process may create namespaces and configure
// them (root, or CAP_NET_ADMIN and CAP_SYS_ADMIN). With CI=true a test that
// would skip fails instead, because CI must run every namespace test.
func Require(t testing.TB) {
	t.Helper()
	reason := ""
	switch {
	case runtime.GOOS != "linux":
		reason = "network namespaces need Linux"
	case !hasCapabilities():
		reason = "network namespace tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
	default:
		if _, err := exec.LookPath("ip"); err != nil {
			reason = "network namespace tests need the ip command (Debian package iproute2)"
		}
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s, and CI=true does not allow skipping", reason)
	}
	t.Skip(reason)
}

func hasCapabilities() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	const need = 1<<unix.CAP_NET_ADMIN | 1<<unix.CAP_SYS_ADMIN
	return data[0].Effective&need == need
}

var sequence atomic.Int64

// staleSweep removes, once per test process, the namespaces that a test
// process which has ended left behind. A test cleans up after itself also
// when it fails, but not when its process is killed (a go test timeout, a
// SIGKILL), and such namespaces would stay until the next boot.
var staleSweep sync.Once

// removeStale deletes the namespaces named by New whose process no longer
// exists. A namespace of a process that is still running, or of an unknown
// name, is left alone.
func removeStale() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for line := range strings.SplitSeq(string(out), "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		name := fields[0]
		var pid, seq int
		var role string
		if n, _ := fmt.Sscanf(name, "iapd%d-%d-%s", &pid, &seq, &role); n != 3 || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			continue
		}
		exec.Command("ip", "netns", "del", name).Run()
	}
}

// NS is a network namespace made for one test. It is removed in t.Cleanup.
type NS struct {
	Name   string
	handle netns.NsHandle
}

// New creates a namespace whose name holds the process ID, a sequence
// number and role, so that parallel runs never collide. Its loopback
// interface is up.
func New(t testing.TB, role string) *NS {
	t.Helper()
	staleSweep.Do(removeStale)
	name := fmt.Sprintf("iapd%d-%d-%s", os.Getpid(), sequence.Add(1), role)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("removing namespace %s: %v: %s", name, err, out)
		}
	})

	h, err := netns.GetFromName(name)
	if err != nil {
		t.Fatalf("opening namespace %s: %v", name, err)
	}
	t.Cleanup(func() { h.Close() })

	n := &NS{Name: name, handle: h}
	n.IP(t, "link", "set", "lo", "up")
	return n
}

// IP runs "ip -n NAME args..." and returns its output; a failure fails t.
func (n *NS) IP(t testing.TB, args ...string) string {
	t.Helper()
	return run(t, "ip", append([]string{"-n", n.Name}, args...)...)
}

// Exec runs a command inside the namespace and returns its combined
// output; a failure fails t.
func (n *NS) Exec(t testing.TB, args ...string) string {
	t.Helper()
	return run(t, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Command returns a command that runs inside the namespace.
func (n *NS) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

// Do runs fn on a new OS thread switched into the namespace. Sockets that
// fn creates belong to the namespace for their whole life; goroutines that
// fn starts do not run in it. If the thread cannot switch back, it stays
// locked so that the runtime discards it.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("reading current namespace: %w", err)
			return
		}
		defer orig.Close()

		if err := netns.Set(n.handle); err != nil {
			errc <- fmt.Errorf("entering namespace %s: %w", n.Name, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- fmt.Errorf("leaving namespace %s: %w", n.Name, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a listener inside the namespace.
func (n *NS) Listen(t testing.TB, network, address string) net.Listener {
	t.Helper()
	var ln net.Listener
	err := n.Do(func() (err error) {
		ln, err = net.Listen(network, address)
		return err
	})
	if err != nil {
		t.Fatalf("listening on %s %s in %s: %v", network, address, n.Name, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// ListenPacket opens a packet socket inside the namespace.
func (n *NS) ListenPacket(t testing.TB, network, address string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	err := n.Do(func() (err error) {
		pc, err = net.ListenPacket(network, address)
		return err
	})
	if err != nil {
		t.Fatalf("listening on %s %s in %s: %v", network, address, n.Name, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// Veth joins two namespaces with a veth pair named aName in a and bName in
// b. Both ends are left down and without addresses. Deleting the namespaces
// deletes the pair.
func Veth(t testing.TB, a *NS, aName string, b *NS, bName string) {
	t.Helper()
	a.IP(t, "link", "add", aName, "type", "veth", "peer", "name", bName, "netns", b.Name)
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
