package proxy

import (
	"net"
	"slices"
	"sync"
	"time"
)

// workerIdleTimeout is how long a handshake worker waits for the next
// connection before it ends.
const workerIdleTimeout = 10 * time.Second

// handshake is one accepted connection, the front end that serves it,
// which counts the connection as busy until it has been served, and the
// listener that counts it against its max_connections until it ends.
type handshake struct {
	conn     net.Conn
	fe       *frontend
	listener *servedListener
}

// workerPool runs the front ends' handshakes on goroutines that serve one
// connection after another. A handshake passes through deep library and
// dial frames; a goroutine started for each connection would grow its
// stack (copying it) on every connection, while a worker keeps the stack
// it grew. Workers end after workerIdleTimeout without work, or when the
// server closes. The zero value is ready to use.
type workerPool struct {
	mu   sync.Mutex
	idle []chan handshake // guarded by mu; most recently idle last
	wg   sync.WaitGroup   // one per running worker
}

// dispatch hands h to an idle worker, or to a new one.
func (s *Server) dispatch(h handshake) {
	p := &s.workers
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		next := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		next <- h // buffered: never blocks
		return
	}
	p.mu.Unlock()

	p.wg.Add(1)
	go s.runWorker(h)
}

// runWorker serves h and then further handshakes handed to it, until it
// has been idle for workerIdleTimeout or the server closes.
func (s *Server) runWorker(h handshake) {
	p := &s.workers
	defer p.wg.Done()
	next := make(chan handshake, 1)
	var idle *time.Timer
	for {
		s.serveHandshake(h)
		h = handshake{}

		p.mu.Lock()
		p.idle = append(p.idle, next)
		p.mu.Unlock()
		if idle == nil {
			idle = time.NewTimer(workerIdleTimeout)
		} else {
			idle.Reset(workerIdleTimeout)
		}

		select {
		case h = <-next:
			continue
		case <-idle.C:
		case <-s.ctx.Done():
		}

		// Leave the idle list, unless dispatch has just taken this worker
		// from it and its handshake is on the way.
		p.mu.Lock()
		i := slices.Index(p.idle, next)
		if i >= 0 {
			p.idle = slices.Delete(p.idle, i, i+1)
		}
		p.mu.Unlock()
		if i >= 0 {
			idle.Stop()
			return
		}
		h = <-next
	}
}

// serveHandshake serves h's connection with its front end and then gives
// back what the connection held. When a relay owns the connection after
// the front end, the relay closes it and gives back its count on the
// listener when the tunnel ends.
func (s *Server) serveHandshake(h handshake) {
	relaying := false
	defer func() {
		h.fe.release()
		s.removeClient(h.conn, !relaying)
		if !relaying {
			h.listener.active.Add(-1)
		}
	}()
	defer s.recoverConn()
	relaying = h.fe.serve(h.conn)
}
