package proxy

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"iapd/internal/logkey"
)

// relayCopies counts how the relay moved each direction of each tunnel.
// Kernel counts directions copied with splice(2) between two TCP sockets,
// which keeps the bytes out of user space. User counts directions that fell
// back to a read and write loop: connections that are not TCP, and systems
// without splice.
var relayCopies struct {
	Kernel atomic.Int64
	User   atomic.Int64
}

// tunnel is one relayed connection: a client and its upstream, with each
// direction copied by its own goroutine.
type tunnel struct {
	s      *Server
	client net.Conn
	up     *upstream

	running atomic.Int32 // directions still copying
	failed  atomic.Bool  // a direction failed and closed both connections
	err     error        // first failure; written once, by the goroutine that set failed
	ended   func(error)  // if set, called with err once both connections are closed

	// listener accepted the client and counts it against its
	// max_connections until the tunnel ends; nil when no listener did.
	listener *servedListener
}

// startRelay relays between client and up in two new goroutines and
// returns at once. Each direction passes its end of stream on as a
// half-close. When both directions have ended, the relay closes both
// connections, which removes up from the table. When one direction fails,
// it closes both at once, so that the other ends too. The server's Close
// waits for the relay.
//
// The goroutines start here, not in the front end's goroutine, so that
// their stacks do not keep the depth that the handshake reached: an idle
// tunnel costs two small stacks.
func (s *Server) startRelay(client net.Conn, up *upstream) {
	s.startRelayNotify(client, up, nil)
}

// startRelayNotify is startRelay that calls ended, if set, with the first
// failure (nil when both directions ended cleanly) once the tunnel has
// closed.
func (s *Server) startRelayNotify(client net.Conn, up *upstream, ended func(error)) {
	t := &tunnel{s: s, client: client, up: up, ended: ended, listener: s.listenerOf(client)}
	up.client.Store(client)
	t.running.Store(2)
	s.conns.Add(1)
	go t.copyUp()
	go t.copyDown()
}

// copyUp copies from the client to the target.
func (t *tunnel) copyUp() {
	var err error
	defer func() { t.finish(err) }()
	defer t.s.recoverCopy(&err)
	err = t.relayDirection(t.up.Conn, t.client, &t.up.up)
}

// copyDown copies from the target to the client.
func (t *tunnel) copyDown() {
	var err error
	defer func() { t.finish(err) }()
	defer t.s.recoverCopy(&err)
	err = t.relayDirection(t.client, t.up.Conn, &t.up.down)
}

// finish records the end of one direction and, after the last, closes the
// tunnel.
func (t *tunnel) finish(err error) {
	if err != nil && t.failed.CompareAndSwap(false, true) {
		t.err = err
		t.client.Close()
		t.up.Close()
	}
	if t.running.Add(-1) > 0 {
		return
	}

	t.client.Close()
	t.up.Close()
	if t.err != nil && !errors.Is(t.err, net.ErrClosed) && t.s.logger.Enabled(t.s.ctx, slog.LevelDebug) {
		t.s.logger.Debug("tunnel failed", logkey.App, t.up.info.App, logkey.Target, t.up.info.Target, logkey.Err, t.err)
	}
	if t.listener != nil {
		t.listener.active.Add(-1)
	}
	if t.ended != nil {
		t.ended(t.err)
	}
	t.s.conns.Done()
}

// relayDirection copies from src to dst until src ends, adding the bytes
// to count as they are written, and then half-closes dst. Two TCP sockets
// are copied by the kernel where the system can; other connections
// through a buffer.
func (t *tunnel) relayDirection(dst, src net.Conn, count *atomic.Int64) error {
	dstTCP, dstOK := dst.(*net.TCPConn)
	srcTCP, srcOK := src.(*net.TCPConn)
	var err error
	if handled := false; dstOK && srcOK {
		handled, err = spliceCopy(dstTCP, srcTCP, count)
		if handled {
			relayCopies.Kernel.Add(1)
		} else {
			relayCopies.User.Add(1)
			err = bufferCopy(dst, src, count)
		}
	} else {
		relayCopies.User.Add(1)
		err = bufferCopy(dst, src, count)
	}
	if err != nil {
		return err
	}

	// When the other direction has ended already, finish closes both
	// connections at once, and close(2) sends the FIN that the half-close
	// would: one system call fewer on every connection that ends cleanly.
	if t.running.Load() == 1 {
		return nil
	}
	return closeWrite(dst)
}

// closeWrite half-closes c when it can, which passes the end of stream on
// to its peer. A connection that cannot half-close is left open until the
// other direction ends too.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// relayBufferSize is the buffer of one direction that the relay copies
// through user space.
const relayBufferSize = 32 << 10

var relayBuffers = sync.Pool{New: func() any { return new([relayBufferSize]byte) }}

// bufferCopy copies from src to dst through a pooled buffer until src
// ends, adding the bytes to count as they are written. It returns nil at
// the end of src.
//
// NOTE: the buffer stays taken while Read waits, so an idle tunnel on this
// path (a connection that is not a bare TCP socket, or a system without
// splice) costs relayBufferSize per direction.
func bufferCopy(dst, src net.Conn, count *atomic.Int64) error {
	buf := relayBuffers.Get().(*[relayBufferSize]byte)
	defer relayBuffers.Put(buf)
	for {
		n, rerr := src.Read(buf[:])
		if n > 0 {
			m, werr := dst.Write(buf[:n])
			count.Add(int64(m))
			if werr != nil {
				return werr
			}
			if m < n {
				return io.ErrShortWrite
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}
