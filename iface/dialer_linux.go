package iface

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// bindToIndexUnsupported records that the kernel rejected SO_BINDTOIFINDEX
// (added in Linux 5.0), so that later sockets go straight to binding by
// name with SO_BINDTODEVICE.
var bindToIndexUnsupported atomic.Bool

func (d *Dialer) dialBound(ctx context.Context, network, address string, ifc *Interface, src netip.Addr) (net.Conn, error) {
	nd := net.Dialer{
		LocalAddr: localAddr(network, src),
		Control:   composeControl(bindToInterface(ifc.Index, ifc.Name), setMark(d.mark)),
	}
	return nd.DialContext(ctx, network, address)
}

// controlFunc is the type of net.Dialer.Control and net.ListenConfig.Control.
type controlFunc = func(network, address string, c syscall.RawConn) error

// composeControl returns a Control function that runs fns in order and
// stops at the first error. Nil entries are skipped.
func composeControl(fns ...controlFunc) controlFunc {
	return func(network, address string, c syscall.RawConn) error {
		for _, fn := range fns {
			if fn == nil {
				continue
			}
			if err := fn(network, address, c); err != nil {
				return err
			}
		}
		return nil
	}
}

// bindToInterface returns a Control function that binds a socket to the
// interface, by index where the kernel allows and by name otherwise
// (socket(7), SO_BINDTOIFINDEX and SO_BINDTODEVICE).
func bindToInterface(ifindex int, name string) controlFunc {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = bindSocket(int(fd), ifindex, name)
		})
		if err != nil {
			return err
		}
		return serr
	}
}

func bindSocket(fd, ifindex int, name string) error {
	if !bindToIndexUnsupported.Load() {
		err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, ifindex)
		if !errors.Is(err, unix.ENOPROTOOPT) {
			return os.NewSyscallError("setsockopt SO_BINDTOIFINDEX", err)
		}
		bindToIndexUnsupported.Store(true)
	}
	return os.NewSyscallError("setsockopt SO_BINDTODEVICE", unix.BindToDevice(fd, name))
}

// setMark returns a Control function that sets the socket's firewall mark,
// which selects the access point's routing table (socket(7), SO_MARK).
// Mark 0 leaves the socket unmarked.
func setMark(mark uint32) controlFunc {
	if mark == 0 {
		return nil
	}
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		})
		if err != nil {
			return err
		}
		return os.NewSyscallError("setsockopt SO_MARK", serr)
	}
}
