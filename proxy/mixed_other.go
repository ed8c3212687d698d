//go:build !linux

package proxy

import "net"

// peekByte returns the first byte that c has received. Outside Linux it
// reads the byte into a buffer, so the relay of such a connection copies in
// user space.
func peekByte(c net.Conn) (byte, net.Conn, error) { return peekBuffered(c) }
