package cli

import (
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// setReusePort sets or clears SO_REUSEPORT on an open socket. Linux reads
// the option of a bound socket each time another socket binds to its
// port, so setting it on a listening socket lets a new one share the port
// (socket(7)).
func setReusePort(c syscall.Conn, on bool) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return setReusePortRaw(raw, on)
}

// withReusePort returns a Control function for net.ListenConfig that runs
// control, when not nil, and then sets SO_REUSEPORT before the socket
// binds.
func withReusePort(control func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		if control != nil {
			if err := control(network, address, c); err != nil {
				return err
			}
		}
		return setReusePortRaw(c, true)
	}
}

func setReusePortRaw(raw syscall.RawConn, on bool) error {
	value := 0
	if on {
		value = 1
	}
	var opErr error
	err := raw.Control(func(fd uintptr) {
		opErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, value)
	})
	if err != nil {
		return err
	}
	if opErr != nil {
		return os.NewSyscallError("setsockopt SO_REUSEPORT", opErr)
	}
	return nil
}
