//go:build !linux

package proxy

import (
	"net"
	"time"
)

// kernelIdle is not available here; the byte counts alone tell idleness.
func kernelIdle(*net.TCPConn) (time.Duration, bool) { return 0, false }
