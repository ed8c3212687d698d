package proxy

import (
	"errors"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// pipeSize is the capacity the relay requests for its pipes, and so the
// maximum that one splice(2) moves. 1 MiB is the default of
// /proc/sys/fs/pipe-max-size; where the kernel refuses it, a pipe keeps
// its default of 64 KiB and splices move less per call.
const pipeSize = 1 << 20

// maxIdlePipes bounds the pipes kept open between uses. Only a direction
// that is moving bytes holds one, so this many cover every direction that
// runs at the same moment on a small host; beyond it, pipes are closed
// when they are returned.
//
// NOTE: 32 is an estimate, checked only on 2 cores. A host that moves
// bytes on many more tunnels at once creates and closes pipes more often.
const maxIdlePipes = 32

// pipeIdleTimeout is how long a pipe stays open in the pool unused before
// it is closed, so that a daemon gives its pipes back once the traffic
// has stopped. It is a variable for the tests.
var pipeIdleTimeout = 5 * time.Second

// relayPipe is a pipe(2) that carries bytes from one socket to another
// inside the kernel. It is owned by one direction of one tunnel at a time.
type relayPipe struct {
	r, w int       // read and write ends, both non-blocking
	idle time.Time // when it was last returned to the pool
}

// pipePool keeps idle pipes for reuse. The zero value is ready to use and
// it is safe for concurrent use.
type pipePool struct {
	mu   sync.Mutex
	free []*relayPipe // guarded by mu; least recently returned first
	trim *time.Timer  // guarded by mu; set while pipes are idle, to close the stale ones
	open atomic.Int64 // pipes open, idle or in use
}

var pipes pipePool

// get returns the most recently returned idle pipe, or a new one.
func (pp *pipePool) get() (*relayPipe, error) {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()

	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	// A smaller pipe works too, with more calls per byte.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	pp.open.Add(1)
	return &relayPipe{r: fds[0], w: fds[1]}, nil
}

// put returns an empty pipe for reuse, or closes it when enough are idle.
func (pp *pipePool) put(p *relayPipe) {
	p.idle = time.Now()
	pp.mu.Lock()
	if len(pp.free) < maxIdlePipes {
		pp.free = append(pp.free, p)
		if pp.trim == nil {
			pp.trim = time.AfterFunc(pipeIdleTimeout, pp.closeStale)
		}
		pp.mu.Unlock()
		return
	}
	pp.mu.Unlock()
	pp.discard(p)
}

// closeStale closes the pipes that have been idle for pipeIdleTimeout, and
// runs again when the oldest of the others will have been.
func (pp *pipePool) closeStale() {
	now := time.Now()
	pp.mu.Lock()
	n := 0
	for n < len(pp.free) && now.Sub(pp.free[n].idle) >= pipeIdleTimeout {
		n++
	}
	stale := slices.Clone(pp.free[:n])
	pp.free = slices.Delete(pp.free, 0, n)
	if len(pp.free) > 0 {
		pp.trim.Reset(pipeIdleTimeout - now.Sub(pp.free[0].idle))
	} else {
		pp.trim = nil
	}
	pp.mu.Unlock()

	for _, p := range stale {
		pp.discard(p)
	}
}

// discard closes a pipe that still holds bytes or is not needed.
func (pp *pipePool) discard(p *relayPipe) {
	unix.Close(p.r)
	unix.Close(p.w)
	pp.open.Add(-1)
}

// smallCopySize is the size of the buffer through which a direction
// copies until one read fills it. Small pieces (handshakes, requests,
// interactive traffic) cost less to read and write than to splice through
// a pipe. A full read marks a bulk transfer, which splices from then on.
const smallCopySize = 16 << 10

// relayBytes counts the bytes that directions copied with splice(2) between
// two TCP sockets, and those they copied through the small buffer first.
var relayBytes struct {
	Spliced atomic.Int64
	Copied  atomic.Int64
}

var smallBuffers = sync.Pool{New: func() any { return new([smallCopySize]byte) }}

// spliceCopy copies from src to dst until src ends, adding the bytes to
// count as they leave for dst. It copies through a small buffer at first,
// and with splice(2) once the bytes come in bulk.
//
// It reports handled false when it stops with no byte lost and the caller
// should copy the rest through a buffer of its own. That happens when no
// pipe can be had (out of file descriptors), or when the kernel cannot
// splice these sockets before any byte has moved.
//
// It waits for src to become readable holding neither buffer nor pipe.
// Each read or splice after a wake-up takes one from its pool, and one
// that finds nothing to read returns it before the goroutine parks in the
// runtime's poller, so an idle tunnel holds neither.
func spliceCopy(dst, src *net.TCPConn, count *atomic.Int64) (handled bool, err error) {
	srcRaw, err := src.SyscallConn()
	if err != nil {
		return false, nil
	}
	dstRaw, err := dst.SyscallConn()
	if err != nil {
		return false, nil
	}

	var s spliceState
	s.count = count
	defer s.release()
	fill, drain := s.fill, s.drain // one allocation each for the whole copy
	for {
		if err := srcRaw.Read(fill); err != nil {
			return true, err
		}
		if s.err != nil {
			// EINVAL means that splice does not work on these sockets;
			// nothing was consumed.
			if s.noPipe || errors.Is(s.err, syscall.EINVAL) && !s.moved {
				return false, nil
			}
			if errors.Is(s.err, syscall.EINVAL) {
				s.err, s.bulk, s.noSplice = nil, false, true
				pipes.put(s.pipe) // empty: the failed splice moved nothing
				s.pipe = nil
				continue
			}
			return true, s.err
		}
		if s.inPipe == 0 && len(s.pending) == 0 {
			return true, nil // end of stream
		}
		s.moved = true

		if err := dstRaw.Write(drain); err != nil {
			return true, err
		}
		if s.err != nil {
			return true, s.err
		}
	}
}

// spliceState is one direction's progress, shared by the callbacks that
// run under the sockets' read and write locks.
type spliceState struct {
	buf     *[smallCopySize]byte // held while bytes move by read and write; nil while waiting
	pending []byte               // bytes read into buf and not yet written
	bulk    bool                 // a read filled buf: splice from now on
	// noSplice is set when splice(2) failed with EINVAL after bytes had
	// moved through buf, so that the direction keeps to read and write.
	noSplice bool

	pipe   *relayPipe // held while bytes move; nil while waiting for data
	inPipe int        // bytes spliced into pipe and not yet out of it
	count  *atomic.Int64
	err    error // error of the last read, splice or pipe creation
	noPipe bool  // err is from creating a pipe
	moved  bool  // some bytes have been copied
}

// fill reads what src has received into the buffer or, in bulk, splices it
// into the pipe. When there is nothing to read, it hands the buffer or pipe
// back and returns false, which parks the goroutine until src is readable.
func (s *spliceState) fill(fd uintptr) bool {
	if !s.bulk {
		return s.read(fd)
	}
	if s.pipe == nil {
		p, err := pipes.get()
		if err != nil {
			s.err, s.noPipe = err, true
			return true
		}
		s.pipe = p
	}
	for {
		n, err := unix.Splice(int(fd), nil, s.pipe.w, nil, pipeSize, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			pipes.put(s.pipe)
			s.pipe = nil
			return false
		case err != nil:
			s.err = os.NewSyscallError("splice", err)
			return true
		}
		s.inPipe = int(n)
		return true
	}
}

// read reads what src has received into the buffer.
func (s *spliceState) read(fd uintptr) bool {
	if s.buf == nil {
		s.buf = smallBuffers.Get().(*[smallCopySize]byte)
	}
	for {
		n, err := unix.Read(int(fd), s.buf[:])
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			smallBuffers.Put(s.buf)
			s.buf = nil
			return false
		case err != nil:
			s.err = os.NewSyscallError("read", err)
			return true
		}
		s.pending = s.buf[:n]
		s.bulk = n == smallCopySize && !s.noSplice
		return true
	}
}

// drain writes the buffer's or splices the pipe's bytes out to dst. It
// returns false, which parks the goroutine until dst is writable, when
// dst's send buffer is full.
func (s *spliceState) drain(fd uintptr) bool {
	if s.buf != nil {
		return s.write(fd)
	}
	for s.inPipe > 0 {
		n, err := unix.Splice(s.pipe.r, nil, int(fd), nil, s.inPipe, unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		if n > 0 {
			s.inPipe -= int(n)
			s.count.Add(n)
			relayBytes.Spliced.Add(n)
			continue
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil:
			s.err = os.NewSyscallError("splice", err)
		default:
			// The pipe holds bytes, so splice(2) should not return zero
			// without an error; stop rather than spin if it does.
			s.err = os.NewSyscallError("splice", syscall.EIO)
		}
		return true
	}
	return true
}

// write writes the buffer's bytes out to dst and hands the buffer back
// once they have all left.
func (s *spliceState) write(fd uintptr) bool {
	for len(s.pending) > 0 {
		n, err := unix.Write(int(fd), s.pending)
		if n > 0 {
			s.pending = s.pending[n:]
			s.count.Add(int64(n))
			relayBytes.Copied.Add(int64(n))
			continue
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil:
			s.err = os.NewSyscallError("write", err)
		default:
			s.err = os.NewSyscallError("write", syscall.EIO)
		}
		return true
	}
	smallBuffers.Put(s.buf)
	s.buf = nil
	return true
}

// release returns the buffer and the pipe, or closes the pipe when bytes
// are left in it.
func (s *spliceState) release() {
	if s.buf != nil {
		smallBuffers.Put(s.buf)
		s.buf, s.pending = nil, nil
	}
	if s.pipe == nil {
		return
	}
	if s.inPipe > 0 {
		pipes.discard(s.pipe)
	} else {
		pipes.put(s.pipe)
	}
	s.pipe = nil
}
