package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
)

// peekByte returns the first byte that c has received, leaving it in the
// socket's receive queue with MSG_PEEK (recv(2)), so that c stays a plain
// *net.TCPConn that the relay can splice. It waits under c's read deadline.
// Connections without a file descriptor fall back to a buffered peek.
func peekByte(c net.Conn) (byte, net.Conn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return peekBuffered(c)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return peekBuffered(c)
	}

	var buf [1]byte
	var n int
	var recvErr error
	err = raw.Read(func(fd uintptr) bool {
		for {
			n, _, recvErr = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK)
			if !errors.Is(recvErr, syscall.EINTR) {
				break
			}
		}
		// EAGAIN: nothing received yet, so wait for the socket to become
		// readable and try again.
		return !errors.Is(recvErr, syscall.EAGAIN)
	})
	switch {
	case err != nil:
		return 0, c, err
	case recvErr != nil:
		return 0, c, os.NewSyscallError("recvfrom", recvErr)
	case n == 0:
		return 0, c, io.EOF
	}
	return buf[0], c, nil
}
