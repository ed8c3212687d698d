package netnstest

import (
	"io"
	"net"
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
