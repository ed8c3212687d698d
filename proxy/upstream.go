package proxy

import (
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"iapd/internal/logkey"
)

// upstream is a dialled connection as the connection table tracks it. It
// counts the bytes that pass and leaves the table on Close. The relay
// copies between the bare sockets and adds to the counts itself. It is
// safe for concurrent use as a net.Conn is.
type upstream struct {
	net.Conn // as the access point's dialer returned it

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

	// client is the tunnel's client connection (a net.Conn), stored when
	// the relay starts. A close with a reason resets it too: closing only
	// the upstream would leave a relay blocked on writing to a client that
	// does not read, and a client that reads would see a clean end of
	// stream where its transfer was cut.
	client atomic.Value

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
func (u *upstream) CloseWrite() error { return closeWrite(u.Conn) }

// CloseRead shuts down the receiving side.
func (u *upstream) CloseRead() error {
	if c, ok := u.Conn.(interface{ CloseRead() error }); ok {
		return c.CloseRead()
	}
	return nil
}

// Close closes the connection and removes it from the table. Only the first
// call has an effect.
func (u *upstream) Close() error { return u.closeWithReason("") }

// closeWithReason closes the connection like Close and records why iapd
// closed it. Only the first call of either has an effect.
func (u *upstream) closeWithReason(reason string) error {
	u.closeOnce.Do(func() {
		if reason != "" {
			u.reset()
		}
		u.closeErr = u.Conn.Close()
		info := u.snapshot()
		info.Reason = reason
		u.s.table.remove(u)
		if u.s.logger.Enabled(u.s.ctx, slog.LevelDebug) {
			attrs := []any{logkey.App, info.App, logkey.AccessPoint, info.AccessPoint, logkey.Target, info.Target,
				"bytes_up", info.BytesUp, "bytes_down", info.BytesDown,
				"duration", time.Since(info.Started).Round(time.Millisecond)}
			if info.Reason != "" {
				attrs = append(attrs, "reason", info.Reason) // iapd's reason for closing; absent when an end closed it
			}
			u.s.logger.Debug("connection closed", attrs...)
		}
		if u.s.cfg.OnClose != nil {
			u.s.cfg.OnClose(info)
		}
	})
	return u.closeErr
}

// reset closes the tunnel's client connection with a TCP reset, so that
// the application notices at once that the connection was cut, and makes
// the upstream's close a reset too; see SO_LINGER in socket(7).
func (u *upstream) reset() {
	if tc, ok := u.Conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c, ok := u.client.Load().(net.Conn)
	if !ok {
		return
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// snapshot returns the table row of u with its current byte counts.
func (u *upstream) snapshot() ConnInfo {
	info := u.info
	info.BytesUp = u.up.Load()
	info.BytesDown = u.down.Load()
	return info
}
