package proxy

import (
	"net"
	"syscall"
	"testing"
)

// TestListenKeepAliveInherited checks that a connection accepted from
// Listen has the keep-alive settings, although Go did not set them on it.
func TestListenKeepAliveInherited(t *testing.T) {
	ln, err := Listen(t.Context(), "127.0.0.1:0")
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dialling: %v", err)
	}
	defer client.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("accepting: %v", err)
	}
	defer c.Close()

	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatalf("SyscallConn: %v", err)
	}
	tests := []struct {
		name       string
		level, opt int
		want       int
	}{
		{name: "SO_KEEPALIVE", level: syscall.SOL_SOCKET, opt: syscall.SO_KEEPALIVE, want: 1},
		{name: "TCP_KEEPIDLE", level: syscall.IPPROTO_TCP, opt: syscall.TCP_KEEPIDLE, want: 15},
		{name: "TCP_KEEPINTVL", level: syscall.IPPROTO_TCP, opt: syscall.TCP_KEEPINTVL, want: 15},
		{name: "TCP_KEEPCNT", level: syscall.IPPROTO_TCP, opt: syscall.TCP_KEEPCNT, want: 9},
		{name: "TCP_NODELAY", level: syscall.IPPROTO_TCP, opt: syscall.TCP_NODELAY, want: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got int
			var getErr error
			if err := raw.Control(func(fd uintptr) { got, getErr = syscall.GetsockoptInt(int(fd), tt.level, tt.opt) }); err != nil {
				t.Fatalf("Control: %v", err)
			}
			if getErr != nil {
				t.Fatalf("getsockopt: %v", getErr)
			}
			if got != tt.want {
				t.Errorf("%s = %d, want %d", tt.name, got, tt.want)
			}
		})
	}
}
