package proxy

import (
	"bufio"
	"io"
	"log/slog"
	"net"
	"time"

	"iapd/internal/logkey"
	"iapd/policy"
)

// socks4Rejected is the SOCKS4 reply "request rejected or failed": version
// 0, status 0x5B, and six bytes of port and address that clients ignore.
var socks4Rejected = []byte{0x00, 0x5B, 0, 0, 0, 0, 0, 0}

// First bytes of the SOCKS versions.
const (
	socks4Version = 0x04
	socks5Version = 0x05
)

// serveMixed distinguishes SOCKS5 from HTTP by the first byte the client sends,
// without consuming it, and hands the connection to that front end. SOCKS5
// starts with its version 5. An HTTP request starts with a method, in
// ASCII letters. SOCKS4 starts with 4 and is rejected in its own protocol.
// It reports whether a relay owns the connection when it returns.
func (s *Server) serveMixed(c net.Conn, l *policy.Listener, socks *socks5Frontend, web *httpFrontend) (relaying bool) {
	c.SetDeadline(time.Now().Add(s.currentLimits().HandshakeTimeout))
	first, c, err := peekByte(c)

	// The logger is built only for a connection that is rejected, because
	// its attributes cost allocations on every connection.
	logger := func() *slog.Logger {
		return s.logger.With(logkey.Listener, l.Listen, logkey.Client, c.RemoteAddr().String())
	}
	if err != nil {
		logger().Debug("reading first byte failed", logkey.Err, err)
		c.Close()
		return false
	}

	switch {
	case first == socks5Version, first == socks4Version:
		// The SOCKS5 front end answers SOCKS4 in its own protocol.
		return socks.serveConn(c)
	case 'A' <= first && first <= 'Z', 'a' <= first && first <= 'z':
		// The HTTP front end sets its own deadlines.
		c.SetDeadline(time.Time{})
		return web.serveConn(c)
	default:
		logger().Debug("client rejected: unknown protocol", "first_byte", first)
		c.Close()
	}
	return false
}

// rejectSOCKS4 answers a SOCKS4 or SOCKS4a client with the SOCKS4
// rejection and closes the connection. The rest of the client's request is
// still unread, and closing a socket with unread input makes the kernel
// send a reset that can overtake the reply, so the request is read and
// dropped first, under the connection's deadline.
func rejectSOCKS4(c net.Conn) {
	c.Write(socks4Rejected)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		io.Copy(io.Discard, io.LimitReader(c, maxSOCKS4Request))
	}
	c.Close()
}

// maxSOCKS4Request bounds what rejectSOCKS4 reads: a SOCKS4a request is 8
// bytes, a user ID and a host name, each ended by NUL.
const maxSOCKS4Request = 8 + 2*256

// peekedConn is a connection whose first bytes were read ahead into r.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// peekBuffered reads the first byte of c into a buffer and returns it with
// a connection that reads the buffer first. The returned connection is no
// longer a *net.TCPConn, so its relay copies in user space.
func peekBuffered(c net.Conn) (byte, net.Conn, error) {
	r := bufio.NewReaderSize(c, 512)
	b, err := r.Peek(1)
	if err != nil {
		return 0, c, err
	}
	return b[0], &peekedConn{Conn: c, r: r}, nil
}
