package proxy

import (
	"io"
	"net"
	"sync/atomic"
)

// The front ends leave each protocol's handshake to its library
// (go-socks5, goproxy) and take the connection back once the upstream is
// dialled and the library has sent its success reply. Both libraries then
// start a relay of their own, with io.Copy in two goroutines, and wait for
// it. iapd hands them two wrappers instead of the bare connections:
// clientConn and handoffUpstream. Once the dial has succeeded, the
// library's copies end at once without touching the sockets, after writing
// the bytes that the library had already read from the client into its
// buffer, and its half-closes and closes do nothing. When the library has
// returned, iapd relays the bare sockets itself with startRelay.
//
// This keeps the libraries' protocol handling and frees their goroutines
// and buffers, so that an idle tunnel costs only the relay's two
// goroutines.

// clientConn is the accepted client connection that a front end hands
// to its library. It is safe for concurrent use as a net.Conn is.
type clientConn struct {
	net.Conn
	handedOff atomic.Bool // the tunnel is iapd's; set once the dial succeeded
}

func newClientConn(c net.Conn) *clientConn { return &clientConn{Conn: c} }

// handOff marks the connection as relayed by iapd from now on.
func (c *clientConn) handOff() { c.handedOff.Store(true) }

// WriteTo copies from the client to w until the client ends, but returns
// at once after the hand-off. bufio.Reader.WriteTo, with which go-socks5
// relays the client's bytes, writes its buffered bytes first and then
// calls this method.
func (c *clientConn) WriteTo(w io.Writer) (int64, error) {
	if c.handedOff.Load() {
		return 0, nil
	}
	return io.Copy(w, readerOnly{c.Conn})
}

// ReadFrom copies from r to the client until r ends, but returns at once
// after the hand-off.
func (c *clientConn) ReadFrom(r io.Reader) (int64, error) {
	if c.handedOff.Load() {
		return 0, nil
	}
	return io.Copy(writerOnly{c.Conn}, r)
}

// CloseWrite shuts down the sending side, except after the hand-off.
func (c *clientConn) CloseWrite() error {
	if c.handedOff.Load() {
		return nil
	}
	return closeWrite(c.Conn)
}

// CloseRead shuts down the receiving side, except after the hand-off.
func (c *clientConn) CloseRead() error {
	if c.handedOff.Load() {
		return nil
	}
	if cr, ok := c.Conn.(interface{ CloseRead() error }); ok {
		return cr.CloseRead()
	}
	return nil
}

// Close closes the connection, except after the hand-off, when the relay
// owns it.
func (c *clientConn) Close() error {
	if c.handedOff.Load() {
		return nil
	}
	return c.Conn.Close()
}

// handoffUpstream is the dialled upstream connection that a front end
// returns to its library. Write passes, so that the client's bytes that the
// library has buffered reach the target; the library's relay calls return
// at once. It is safe for concurrent use as a net.Conn is.
type handoffUpstream struct {
	*upstream
	// released, if set, is called when the library closes the upstream,
	// which goproxy does last, after its copies have returned.
	released func()
}

// WriteTo returns at once: the relay copies from the target.
func (u *handoffUpstream) WriteTo(io.Writer) (int64, error) { return 0, nil }

// ReadFrom returns at once: the relay copies to the target.
func (u *handoffUpstream) ReadFrom(io.Reader) (int64, error) { return 0, nil }

// CloseWrite does nothing: the relay passes the client's half-close on.
func (u *handoffUpstream) CloseWrite() error { return nil }

// CloseRead does nothing: the relay ends the connection.
func (u *handoffUpstream) CloseRead() error { return nil }

// Close leaves the connection open for the relay and reports that the
// library is done with it.
func (u *handoffUpstream) Close() error {
	if u.released != nil {
		u.released()
	}
	return nil
}

// readerOnly and writerOnly hide the io.WriterTo and io.ReaderFrom methods
// of what they wrap, so that a fallback io.Copy does not call back into the
// method it falls back from.
type readerOnly struct{ io.Reader }

type writerOnly struct{ io.Writer }
