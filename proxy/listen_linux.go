package proxy

import (
	"net"
	"os"
	"syscall"
)

// ListenConfig returns the configuration that Listen opens sockets with,
// for callers that add options of their own to its Control. It sets
// keep-alive on the listening socket, which accepted sockets inherit on
// Linux, and turns off Go's setting of it on each.
func ListenConfig() *net.ListenConfig {
	return &net.ListenConfig{
		KeepAlive: -1,
		Control: func(_, _ string, c syscall.RawConn) error {
			var opErr error
			err := c.Control(func(fd uintptr) {
				opts := []struct{ level, name, value int }{
					{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, int(keepAliveIdle.Seconds())},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, int(keepAliveInterval.Seconds())},
					{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, keepAliveCount},
				}
				for _, o := range opts {
					if err := syscall.SetsockoptInt(int(fd), o.level, o.name, o.value); err != nil {
						opErr = os.NewSyscallError("setsockopt", err)
						return
					}
				}
			})
			if err != nil {
				return err
			}
			return opErr
		},
	}
}
