package netnstest

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
)

func TestPrivilegedVethConnects(t *testing.T) {
	Require(t)
	a := New(t, "a")
	b := New(t, "b")
	Veth(t, a, "va", b, "vb")
	a.IP(t, "addr", "add", "198.51.100.1/24", "dev", "va")
	b.IP(t, "addr", "add", "198.51.100.2/24", "dev", "vb")
	a.IP(t, "link", "set", "va", "up")
	b.IP(t, "link", "set", "vb", "up")

	ln := b.Listen(t, "tcp", "198.51.100.2:0")
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.WriteString(c, c.RemoteAddr().String())
		c.Close()
	}()

	var got string
	err := a.Do(func() error {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		b, err := io.ReadAll(c)
		got = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(got, "198.51.100.1:") {
		t.Errorf("server saw client %q, want 198.51.100.1:port", got)
	}
}

func TestPrivilegedNamespaceIsolated(t *testing.T) {
	Require(t)
	n := New(t, "iso")
	out := n.IP(t, "-o", "link", "show")
	if lines := strings.Count(strings.TrimSpace(out), "\n") + 1; lines != 1 {
		t.Errorf("new namespace has %d links, want only lo:\n%s", lines, out)
	}
}

// TestPrivilegedRemovesStaleNamespaces checks that the namespaces of a test
// process that has ended are removed, and those of a running one are not.
func TestPrivilegedRemovesStaleNamespaces(t *testing.T) {
	Require(t)
	ended := exec.Command("true")
	if err := ended.Run(); err != nil {
		t.Fatal(err)
	}
	stale := fmt.Sprintf("iapd%d-1-stale", ended.Process.Pid)
	running := fmt.Sprintf("iapd%d-1-running", os.Getppid())
	for _, name := range []string{stale, running} {
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("adding namespace %s: %v: %s", name, err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	}

	removeStale()

	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), stale) {
		t.Errorf("namespace %s of an ended process is still there", stale)
	}
	if !strings.Contains(string(out), running) {
		t.Errorf("namespace %s of a running process was removed", running)
	}
}
