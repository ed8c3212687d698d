package main

import (
	"context"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/armon/go-socks5"
)

// startSOCKS5 serves SOCKS5 on loopback with go-socks5, optionally with
// the benchmark's credentials, and returns its address.
func startSOCKS5(t *testing.T, withAuth bool) netip.AddrPort {
	t.Helper()
	conf := &socks5.Config{Logger: log.New(io.Discard, "", 0)}
	if withAuth {
		conf.Credentials = socks5.StaticCredentials{benchUser: benchPassword}
	}
	srv, err := socks5.New(conf)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go srv.Serve(ln)
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startCONNECTProxy serves a minimal HTTP CONNECT proxy that replies with
// reply and, on a 200 reply, relays to the requested target.
func startCONNECTProxy(t *testing.T, reply string) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 1024)
				n, err := c.Read(buf)
				if err != nil {
					return
				}
				fields := strings.Fields(string(buf[:n]))
				if len(fields) < 2 || fields[0] != "CONNECT" {
					return
				}
				up, err := net.Dial("tcp", fields[1])
				if err != nil {
					return
				}
				defer up.Close()
				io.WriteString(c, reply)
				if !strings.Contains(reply, " 200 ") {
					return
				}
				go io.Copy(up, c)
				io.Copy(c, up)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// startTestSinks runs the sinks in this process and returns an
// environment with them, for measures that need no DNS server.
func startTestSinks(t *testing.T, mode string) *environment {
	t.Helper()
	ends, err := newDataEnds(mode)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ends.close)
	srv, err := startSinkServer(ends)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.close)
	return &environment{sinks: srv.addrs(), sinkPID: os.Getpid(), ends: ends}
}

func TestClientDialEchoes(t *testing.T) {
	s := startTestSinks(t, endsCopy).sinks

	tests := []struct {
		name  string
		mode  mode
		proxy netip.AddrPort
	}{
		{name: "direct", mode: directMode()},
		{name: "socks5 without authentication", mode: proxyModes()[0], proxy: startSOCKS5(t, false)},
		{name: "socks5 with credentials", mode: proxyModes()[1], proxy: startSOCKS5(t, true)},
		{name: "http connect", mode: proxyModes()[2], proxy: startCONNECTProxy(t, "HTTP/1.1 200 Connection established\r\n\r\n")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := client{mode: tt.mode, proxy: tt.proxy}
			latency, err := echoOnce(context.Background(), c, s.echoOnceAddr(0))
			if err != nil {
				t.Fatalf("echoOnce: %v", err)
			}
			if latency <= 0 || latency > handshakeTimeout {
				t.Errorf("latency = %v, want between 0 and %v", latency, handshakeTimeout)
			}
		})
	}
}

func TestClientDialErrors(t *testing.T) {
	s := startTestSinks(t, endsCopy).sinks

	wrongPassword := proxyModes()[1]
	wrongPassword.password = "wrong"
	tests := []struct {
		name    string
		mode    mode
		proxy   netip.AddrPort
		wantErr string
	}{
		{name: "socks5 wrong password", mode: wrongPassword, proxy: startSOCKS5(t, true), wantErr: "SOCKS5 credentials rejected (status 1)"},
		{name: "socks5 method not offered", mode: proxyModes()[0], proxy: startSOCKS5(t, true), wantErr: "SOCKS5 server chose method 255, want 0"},
		{name: "http refused", mode: proxyModes()[2], proxy: startCONNECTProxy(t, "HTTP/1.1 403 Forbidden\r\n\r\n"), wantErr: `failed: "HTTP/1.1 403 Forbidden"`},
		{name: "http bytes after reply", mode: proxyModes()[2], proxy: startCONNECTProxy(t, "HTTP/1.1 200 OK\r\n\r\nextra"), wantErr: errExtraBytes.Error()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := client{mode: tt.mode, proxy: tt.proxy}
			conn, err := c.dial(context.Background(), s.echoAddr(0))
			if err == nil {
				conn.Close()
				t.Fatalf("dial succeeded, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("dial error = %q, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestReadSOCKS5Reply(t *testing.T) {
	tests := []struct {
		name    string
		reply   []byte
		wantErr string
	}{
		{name: "ipv4", reply: []byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 80}},
		{name: "ipv6", reply: append([]byte{5, 0, 0, 4}, make([]byte, 18)...)},
		{name: "domain", reply: []byte{5, 0, 0, 3, 1, 'a', 0, 80}},
		{name: "failure code", reply: []byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0}, wantErr: "SOCKS5 CONNECT failed with reply code 5"},
		{name: "unknown address type", reply: []byte{5, 0, 0, 9}, wantErr: "SOCKS5 reply has unknown address type 9"},
		{name: "short address", reply: []byte{5, 0, 0, 1, 127}, wantErr: "reading SOCKS5 reply address: unexpected EOF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A trailing byte must stay unread: it belongs to the target.
			r := strings.NewReader(string(tt.reply) + "!")
			err := readSOCKS5Reply(r)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("error = %v, want nil", err)
			}
			if r.Len() != 1 {
				t.Errorf("%d bytes left unread, want 1", r.Len())
			}
		})
	}
}

func TestRunBulkDirect(t *testing.T) {
	const total = 3*payloadSize + 12345 // several passes over the payload, uneven split
	tests := []struct {
		name    string
		ends    string
		dir     direction
		streams int
	}{
		{name: "copy upload one stream", ends: endsCopy, dir: upload, streams: 1},
		{name: "copy upload three streams", ends: endsCopy, dir: upload, streams: 3},
		{name: "copy download one stream", ends: endsCopy, dir: download, streams: 1},
		{name: "copy download three streams", ends: endsCopy, dir: download, streams: 3},
		{name: "zerocopy upload one stream", ends: endsZeroCopy, dir: upload, streams: 1},
		{name: "zerocopy upload three streams", ends: endsZeroCopy, dir: upload, streams: 3},
		{name: "zerocopy download one stream", ends: endsZeroCopy, dir: download, streams: 1},
		{name: "zerocopy download three streams", ends: endsZeroCopy, dir: download, streams: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := startTestSinks(t, tt.ends)
			rate, err := runBulk(context.Background(), client{mode: directMode()}, env, tt.dir, tt.streams, total)
			if err != nil {
				t.Fatalf("runBulk: %v", err)
			}
			if rate <= 0 {
				t.Errorf("rate = %v MB/s, want above zero", rate)
			}
		})
	}
}

func TestRunSetupDirect(t *testing.T) {
	s := startTestSinks(t, endsCopy).sinks

	sr := runSetup(context.Background(), client{mode: directMode()}, s, 4, 200*time.Millisecond)
	if sr.errors != 0 {
		t.Errorf("errors = %d (first: %v), want 0", sr.errors, sr.firstErr)
	}
	if sr.conns == 0 {
		t.Fatal("no connection completed")
	}
	if p50, p99 := sr.percentile(50), sr.percentile(99); p50 <= 0 || p99 < p50 {
		t.Errorf("p50 = %v, p99 = %v, want 0 < p50 <= p99", p50, p99)
	}
}

func TestOpenTunnelsDirect(t *testing.T) {
	s := startTestSinks(t, endsCopy).sinks

	conns, err := openTunnels(context.Background(), client{mode: directMode()}, s, 30, 4, nil)
	if err == nil {
		conns, err = openTunnels(context.Background(), client{mode: directMode()}, s, 20, 4, conns)
	}
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	if err != nil {
		t.Fatalf("openTunnels: %v", err)
	}
	if len(conns) != 50 {
		t.Fatalf("opened %d tunnels, want 50", len(conns))
	}
	// Tunnels to the plain echo sink stay usable after the first byte.
	if err := echoByte(conns[0]); err != nil {
		t.Errorf("second echo on an open tunnel: %v", err)
	}
}
