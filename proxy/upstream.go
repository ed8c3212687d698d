package proxy

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"iapd/internal/logkey"
)

// copyChunk bounds one kernel copy, so that the byte counts of a long
// transfer advance while it runs instead of only when it ends.
//
// NOTE: bytes of an unfinished chunk reach the table only when the chunk
// fills or the direction ends, so the live counts of a slow, interactive
// connection can lag by up to copyChunk bytes.
const copyChunk = 256 << 10

// relayCopies counts how the relay moved each direction of each connection.
// Kernel counts copies between two TCP sockets through
// (*net.TCPConn).ReadFrom, which on Linux uses splice(2) and keeps the bytes
// out of user space. User counts copies that fell back to a read and write
// loop.
var relayCopies struct {
	Kernel atomic.Int64
	User   atomic.Int64
}

// upstream is a dialled connection as the connection table tracks it. It
// counts the bytes that pass, leaves the table on Close, and lets io.Copy in
// either direction reach (*net.TCPConn).ReadFrom on the raw sockets, so
// that the kernel copies the bytes. It is safe for concurrent use as a
// net.Conn is.
type upstream struct {
	net.Conn              // as the access point's dialer returned it
	tcp      *net.TCPConn // Conn when it is TCP; nil otherwise

	s    *Server
	info ConnInfo // fixed at track; the byte counts live in up and down

	up   atomic.Int64 // client to target
	down atomic.Int64 // target to client

	claim     claim // hold on the caps, given back by Close; fixed at track
	displaced bool  // guarded by s.table.mu; picked to make room, so never picked again

	// lastActive is when the idle sweep last saw the byte counts move, in
	// Unix nanoseconds, and lastTotal the sum it saw then. Only the sweep
	// writes them after track.
	lastActive atomic.Int64
	lastTotal  atomic.Int64

	closeOnce sync.Once
	closeErr  error
}

// Read reads from the target, counting the bytes as sent down to the client.
func (u *upstream) Read(p []byte) (int, error) {
	n, err := u.Conn.Read(p)
	u.down.Add(int64(n))
	return n, err
}

// Write writes to the target, counting the bytes as sent up from the client.
func (u *upstream) Write(p []byte) (int, error) {
	n, err := u.Conn.Write(p)
	u.up.Add(int64(n))
	return n, err
}

// LocalAddr returns the local address as a *net.TCPAddr in every case,
// because go-socks5 builds its success reply by asserting that type.
func (u *upstream) LocalAddr() net.Addr {
	if a, ok := u.Conn.LocalAddr().(*net.TCPAddr); ok {
		return a
	}
	return &net.TCPAddr{IP: net.IPv4zero}
}

// CloseWrite shuts down the sending side, which passes the client's
// half-close on to the target.
func (u *upstream) CloseWrite() error {
	if c, ok := u.Conn.(interface{ CloseWrite() error }); ok {
		return c.CloseWrite()
	}
	return nil
}

// CloseRead shuts down the receiving side.
func (u *upstream) CloseRead() error {
	if c, ok := u.Conn.(interface{ CloseRead() error }); ok {
		return c.CloseRead()
	}
	return nil
}

// ReadFrom copies from r to the target until r ends. When r is a TCP
// connection (bare or wrapped by this package) the kernel copies the bytes.
func (u *upstream) ReadFrom(r io.Reader) (n int64, err error) {
	// The relay libraries call this on goroutines of their own, where a
	// panic would end the daemon.
	defer u.s.recoverCopy(&err)
	if src := rawTCP(r); src != nil && u.tcp != nil {
		relayCopies.Kernel.Add(1)
		return kernelCopy(u.tcp, src, &u.up)
	}
	relayCopies.User.Add(1)
	return io.Copy(writerOnly{u}, r)
}

// WriteTo copies from the target to w until the target ends. When w is a
// TCP connection (bare or wrapped by this package) the kernel copies the
// bytes.
func (u *upstream) WriteTo(w io.Writer) (n int64, err error) {
	defer u.s.recoverCopy(&err)
	if dst := rawTCP(w); dst != nil && u.tcp != nil {
		relayCopies.Kernel.Add(1)
		return kernelCopy(dst, u.tcp, &u.down)
	}
	relayCopies.User.Add(1)
	return io.Copy(w, readerOnly{u})
}

// Close closes the connection and removes it from the table. Only the first
// call has an effect.
func (u *upstream) Close() error { return u.closeWithReason("") }

// closeWithReason closes the connection like Close and records why iapd
// closed it. Only the first call of either has an effect.
func (u *upstream) closeWithReason(reason string) error {
	u.closeOnce.Do(func() {
		u.closeErr = u.Conn.Close()
		info := u.snapshot()
		info.Reason = reason
		u.s.table.remove(u)
		u.s.logger.Debug("connection closed",
			logkey.App, info.App, logkey.AccessPoint, info.AccessPoint, logkey.Target, info.Target,
			"bytes_up", info.BytesUp, "bytes_down", info.BytesDown,
			"duration", time.Since(info.Started).Round(time.Millisecond), "reason", info.Reason)
		if u.s.cfg.OnClose != nil {
			u.s.cfg.OnClose(info)
		}
	})
	return u.closeErr
}

// snapshot returns the table row of u with its current byte counts.
func (u *upstream) snapshot() ConnInfo {
	info := u.info
	info.BytesUp = u.up.Load()
	info.BytesDown = u.down.Load()
	return info
}

// clientConn is an accepted client connection as handed to the SOCKS5
// library. The library relays with io.Copy through a bufio.Reader. After
// writing its buffered bytes, bufio.Reader.WriteTo hands the rest of the
// copy to its source when the source is an io.WriterTo. clientConn is one,
// so the client-to-target direction reaches the kernel copy.
type clientConn struct {
	net.Conn
	tcp *net.TCPConn // Conn when it is TCP; nil otherwise
}

func newClientConn(c net.Conn) *clientConn {
	tcp, _ := c.(*net.TCPConn)
	return &clientConn{Conn: c, tcp: tcp}
}

// CloseWrite shuts down the sending side, which passes the target's
// half-close on to the client.
func (c *clientConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// WriteTo copies from the client to w until the client ends.
func (c *clientConn) WriteTo(w io.Writer) (int64, error) {
	if rf, ok := w.(io.ReaderFrom); ok && c.tcp != nil {
		return rf.ReadFrom(c.tcp)
	}
	return io.Copy(w, readerOnly{c.Conn})
}

// rawTCP returns the TCP socket under x, or nil when there is none.
func rawTCP(x any) *net.TCPConn {
	switch v := x.(type) {
	case *net.TCPConn:
		return v
	case *clientConn:
		return v.tcp
	case *upstream:
		return v.tcp
	}
	return nil
}

// kernelCopy copies from src to dst until src ends, adding each chunk to
// count as it completes. A chunk shorter than asked for with no error means
// that src reached EOF.
func kernelCopy(dst, src *net.TCPConn, count *atomic.Int64) (int64, error) {
	var total int64
	for {
		n, err := dst.ReadFrom(&io.LimitedReader{R: src, N: copyChunk})
		total += n
		count.Add(n)
		if err != nil || n < copyChunk {
			return total, err
		}
	}
}

// relay copies between client and up in both directions until both have
// ended, passing each half-close on, and then closes both. When a copy
// fails, relay closes both at once so that the other direction ends too, and
// returns that first error. It returns nil when both sides closed cleanly.
func relay(client net.Conn, up *upstream) error {
	c := newClientConn(client)
	errc := make(chan error, 2)
	go func() {
		_, err := up.ReadFrom(c.tcpOrConn())
		if err == nil {
			err = up.CloseWrite()
		}
		errc <- err
	}()

	_, err := up.WriteTo(c)
	if err == nil {
		err = c.CloseWrite()
	}
	errc <- err

	var first error
	for range 2 {
		if err := <-errc; err != nil && first == nil {
			first = err
			c.Close()
			up.Close()
		}
	}
	c.Close()
	up.Close()
	return first
}

// tcpOrConn returns the raw TCP socket when there is one, so that an
// upstream reading from it takes the kernel path.
func (c *clientConn) tcpOrConn() io.Reader {
	if c.tcp != nil {
		return c.tcp
	}
	return c.Conn
}

// readerOnly and writerOnly hide the io.WriterTo and io.ReaderFrom methods
// of what they wrap, so that a fallback io.Copy does not call back into the
// method it falls back from.
type readerOnly struct{ io.Reader }

type writerOnly struct{ io.Writer }
