package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"
)

// modeKind is the path by which a client reaches its target.
type modeKind int

const (
	kindDirect modeKind = iota
	kindSOCKS5
	kindHTTPConnect
)

// mode is one way of reaching a sink: directly, through one of iapd's
// listeners, or through a peer proxy. The proxy address is filled in once
// iapd has started.
type mode struct {
	Name     string
	kind     modeKind
	user     string // SOCKS5 user name; empty for no authentication
	password string
	peer     *peer // the peer proxy of the mode; nil for direct and iapd
}

// benchUser and benchPassword are the credentials of the SOCKS5 listener
// with users; the password reaches iapd through benchPasswordEnv.
const (
	benchUser        = "bench"
	benchPassword    = "loopback-benchmark-password"
	benchPasswordEnv = "IAPDBENCH_PASSWORD"
)

func directMode() mode { return mode{Name: "direct", kind: kindDirect} }

// proxyModes returns the modes that go through iapd, in table order.
func proxyModes() []mode {
	return []mode{
		{Name: "socks5", kind: kindSOCKS5},
		{Name: "socks5-auth", kind: kindSOCKS5, user: benchUser, password: benchPassword},
		{Name: "http", kind: kindHTTPConnect},
	}
}

func modeByName(name string) (mode, error) {
	var names []string
	for _, m := range proxyModes() {
		if m.Name == name {
			return m, nil
		}
		names = append(names, m.Name)
	}
	return mode{}, fmt.Errorf("unknown mode %q: use %s", name, strings.Join(names, ", "))
}

// handshakeTimeout bounds one connect plus proxy handshake.
const handshakeTimeout = 10 * time.Second

// dialer keeps clients cheap: no keep-alive probes, so no setsockopt
// calls beyond what connect needs.
var dialer = net.Dialer{KeepAlive: -1, Timeout: handshakeTimeout}

// client dials targets in one mode. proxy is the address of iapd's
// listener for the mode, invalid for direct.
type client struct {
	mode  mode
	proxy netip.AddrPort
}

// clientFor returns the client of m, taking the listener address from d
// (which may be nil for direct).
func clientFor(m mode, d *iapd) client {
	c := client{mode: m}
	switch {
	case m.peer != nil:
		c.proxy = m.peer.addr
	case d != nil:
		c.proxy = d.listenerFor(m)
	}
	return c
}

// dial connects to target, directly or through the proxy, and returns the
// connection ready to carry the application's bytes.
func (c client) dial(ctx context.Context, target netip.AddrPort) (*net.TCPConn, error) {
	addr := target
	if c.mode.kind != kindDirect {
		addr = c.proxy
	}
	nc, err := dialer.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return nil, err
	}
	conn := nc.(*net.TCPConn)

	switch c.mode.kind {
	case kindSOCKS5:
		err = c.handshakeSOCKS5(conn, target)
	case kindHTTPConnect:
		err = handshakeHTTPConnect(conn, target)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// SOCKS5 constants from RFC 1928 and RFC 1929.
const (
	socksVersion     = 5
	socksNoAuth      = 0
	socksUserPass    = 2
	socksCmdConnect  = 1
	socksAtypIPv4    = 1
	socksAtypDomain  = 3
	socksAtypIPv6    = 4
	userPassVersion  = 1
	socksReplyHeader = 4
)

func (c client) handshakeSOCKS5(conn *net.TCPConn, target netip.AddrPort) error {
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	defer conn.SetDeadline(time.Time{})

	method := byte(socksNoAuth)
	if c.mode.user != "" {
		method = socksUserPass
	}
	if _, err := conn.Write([]byte{socksVersion, 1, method}); err != nil {
		return fmt.Errorf("sending SOCKS5 greeting: %w", err)
	}
	var reply [2]byte
	if _, err := io.ReadFull(conn, reply[:]); err != nil {
		return fmt.Errorf("reading SOCKS5 method reply: %w", err)
	}
	if reply[0] != socksVersion || reply[1] != method {
		return fmt.Errorf("SOCKS5 server chose method %d, want %d", reply[1], method)
	}

	if method == socksUserPass {
		msg := []byte{userPassVersion, byte(len(c.mode.user))}
		msg = append(msg, c.mode.user...)
		msg = append(msg, byte(len(c.mode.password)))
		msg = append(msg, c.mode.password...)
		if _, err := conn.Write(msg); err != nil {
			return fmt.Errorf("sending SOCKS5 credentials: %w", err)
		}
		if _, err := io.ReadFull(conn, reply[:]); err != nil {
			return fmt.Errorf("reading SOCKS5 authentication reply: %w", err)
		}
		if reply[1] != 0 {
			return fmt.Errorf("SOCKS5 credentials rejected (status %d)", reply[1])
		}
	}

	req := []byte{socksVersion, socksCmdConnect, 0}
	if target.Addr().Is4() {
		req = append(req, socksAtypIPv4)
	} else {
		req = append(req, socksAtypIPv6)
	}
	req = append(req, target.Addr().AsSlice()...)
	req = binary.BigEndian.AppendUint16(req, target.Port())
	if _, err := conn.Write(req); err != nil {
		return fmt.Errorf("sending SOCKS5 request: %w", err)
	}
	return readSOCKS5Reply(conn)
}

// readSOCKS5Reply reads the whole CONNECT reply, whose length depends on
// the address type of the bound address, so that no reply byte is left
// for the application to read.
func readSOCKS5Reply(conn io.Reader) error {
	var hdr [socksReplyHeader]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return fmt.Errorf("reading SOCKS5 reply: %w", err)
	}
	if hdr[1] != 0 {
		return fmt.Errorf("SOCKS5 CONNECT failed with reply code %d", hdr[1])
	}
	var rest int
	switch hdr[3] {
	case socksAtypIPv4:
		rest = 4 + 2
	case socksAtypIPv6:
		rest = 16 + 2
	case socksAtypDomain:
		var n [1]byte
		if _, err := io.ReadFull(conn, n[:]); err != nil {
			return fmt.Errorf("reading SOCKS5 reply: %w", err)
		}
		rest = int(n[0]) + 2
	default:
		return fmt.Errorf("SOCKS5 reply has unknown address type %d", hdr[3])
	}
	buf := make([]byte, rest)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return fmt.Errorf("reading SOCKS5 reply address: %w", err)
	}
	return nil
}

// errExtraBytes means the proxy sent bytes after its CONNECT reply before
// the client sent anything; no sink does that, so it points at a bug.
var errExtraBytes = errors.New("proxy sent bytes after its CONNECT reply")

func handshakeHTTPConnect(conn *net.TCPConn, target netip.AddrPort) error {
	conn.SetDeadline(time.Now().Add(handshakeTimeout))
	defer conn.SetDeadline(time.Time{})

	hostport := target.String()
	req := "CONNECT " + hostport + " HTTP/1.1\r\nHost: " + hostport + "\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return fmt.Errorf("sending CONNECT request: %w", err)
	}

	// Read until the end of the headers. The reply usually arrives in one
	// segment; reading in blocks keeps the number of system calls low.
	var (
		buf [1024]byte
		n   int
	)
	for {
		m, err := conn.Read(buf[n:])
		n += m
		if end := bytes.Index(buf[:n], []byte("\r\n\r\n")); end >= 0 {
			if end+4 != n {
				return errExtraBytes
			}
			break
		}
		if err != nil {
			return fmt.Errorf("reading CONNECT reply: %w", err)
		}
		if n == len(buf) {
			return errors.New("CONNECT reply headers longer than 1024 bytes")
		}
	}

	status, _, _ := bytes.Cut(buf[:n], []byte("\r\n"))
	fields := strings.Fields(string(status))
	if len(fields) < 2 || !strings.HasPrefix(fields[0], "HTTP/1.") {
		return fmt.Errorf("invalid CONNECT reply status line %q", status)
	}
	if fields[1] != "200" {
		return fmt.Errorf("CONNECT %s failed: %q", hostport, status)
	}
	return nil
}
