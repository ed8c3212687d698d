package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
)

// minimalProxyEnv, set to a loopback address, makes the benchmark's binary
// serve the minimal proxy there instead of measuring.
const minimalProxyEnv = "IAPDBENCH_MINIMAL_PROXY"

// runMinimalProxy serves SOCKS5 without authentication on addr with the
// least a Go proxy can do: a goroutine per connection, a fixed-size
// handshake for IPv4 targets and io.Copy, which splices between TCP
// sockets. It has no policy, limits, table or logging, so its column shows
// the floor of a proxy written in Go on this machine. It returns only on a
// listen error.
func runMinimalProxy(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "minimal proxy:", err)
		return 1
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			continue
		}
		go serveMinimal(c.(*net.TCPConn))
	}
}

// serveMinimal serves one client: greeting, CONNECT to an IPv4 address,
// then a copy each way with half-closes.
func serveMinimal(c *net.TCPConn) {
	defer c.Close()
	var req [10]byte
	if _, err := io.ReadFull(c, req[:3]); err != nil { // version, one method, no authentication
		return
	}
	if _, err := c.Write([]byte{socksVersion, socksNoAuth}); err != nil {
		return
	}
	if _, err := io.ReadFull(c, req[:]); err != nil || req[1] != socksCmdConnect || req[3] != socksAtypIPv4 {
		return
	}

	target := netip.AddrPortFrom(netip.AddrFrom4([4]byte(req[4:8])), binary.BigEndian.Uint16(req[8:10]))
	up, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(target))
	if err != nil {
		fmt.Fprintln(os.Stderr, "minimal proxy:", err)
		c.Write([]byte{socksVersion, 5, 0, socksAtypIPv4, 0, 0, 0, 0, 0, 0}) // connection refused
		return
	}
	defer up.Close()
	if _, err := c.Write([]byte{socksVersion, 0, 0, socksAtypIPv4, 0, 0, 0, 0, 0, 0}); err != nil {
		return
	}

	upDone := make(chan struct{})
	go func() {
		io.Copy(up, c)
		up.CloseWrite()
		close(upDone)
	}()
	io.Copy(c, up)
	c.CloseWrite()
	<-upDone
}
