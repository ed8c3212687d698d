package proxy

import (
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// kernelIdle returns how long ago c last sent or received data, from the
// kernel's TCP_INFO (tcp(7)), in milliseconds of precision.
func kernelIdle(c *net.TCPConn) (time.Duration, bool) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, false
	}
	var info *unix.TCPInfo
	var infoErr error
	err = raw.Control(func(fd uintptr) {
		info, infoErr = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO)
	})
	if err != nil || infoErr != nil {
		return 0, false
	}
	return time.Duration(min(info.Last_data_sent, info.Last_data_recv)) * time.Millisecond, true
}
