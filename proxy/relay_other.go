//go:build !linux

package proxy

import (
	"net"
	"sync/atomic"
)

// spliceCopy reports that it copied nothing, because splice(2) exists only
// on Linux; the relay copies through a buffer instead.
func spliceCopy(dst, src *net.TCPConn, count *atomic.Int64) (handled bool, err error) {
	return false, nil
}
