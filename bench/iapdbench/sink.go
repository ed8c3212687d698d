package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Sinks are the targets of every measure. They run in this process and
// move bytes with sendfile(2) and splice(2) where they can, so that they
// cost as little CPU as possible next to the proxy being measured.
//
// Each bulk transfer starts with an 8-byte big-endian length that the
// client sends after its proxy handshake:
//   - the upload sink reads that many bytes, discards them and replies
//     with one byte, so the client's clock stops only once every byte
//     arrived;
//   - the download sink sends that many bytes and closes.
//
// Neither relies on half-closed connections, so a proxy that does not
// forward a FIN still completes every transfer.
type sinks struct {
	upload   *net.TCPListener
	download *net.TCPListener
	echo     []*net.TCPListener // several ports, see echoPorts
	echoOnce []*net.TCPListener // as echo, but each closes after one byte
	payload  *payload

	wg sync.WaitGroup
}

// echoPorts is the number of listeners of each echo kind. Connections
// spread over several destination ports, so that more source ports are
// free for each destination.
const echoPorts = 4

// payloadSize is the size of the in-memory file that download sinks and
// upload clients send from; larger transfers send it repeatedly.
const payloadSize = 32 << 20

func newSinks() (*sinks, error) {
	p, err := newPayload(payloadSize)
	if err != nil {
		return nil, err
	}
	s := &sinks{payload: p}

	listen := func() (*net.TCPListener, error) {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, fmt.Errorf("opening sink listener on 127.0.0.1: %w", err)
		}
		return ln, nil
	}
	if s.upload, err = listen(); err != nil {
		s.close()
		return nil, err
	}
	if s.download, err = listen(); err != nil {
		s.close()
		return nil, err
	}
	for range echoPorts {
		ln, err := listen()
		if err != nil {
			s.close()
			return nil, err
		}
		s.echo = append(s.echo, ln)
		if ln, err = listen(); err != nil {
			s.close()
			return nil, err
		}
		s.echoOnce = append(s.echoOnce, ln)
	}

	s.serve(s.upload, s.serveUpload)
	s.serve(s.download, s.serveDownload)
	for _, ln := range s.echo {
		s.serve(ln, serveEcho)
	}
	for _, ln := range s.echoOnce {
		s.serve(ln, serveEchoOnce)
	}
	return s, nil
}

func (s *sinks) serve(ln *net.TCPListener, handle func(*net.TCPConn)) {
	s.wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return // closed
			}
			go handle(c)
		}
	})
}

// close stops accepting. Connections already accepted end when their
// clients close them.
func (s *sinks) close() {
	lns := append([]*net.TCPListener{s.upload, s.download}, s.echo...)
	for _, ln := range append(lns, s.echoOnce...) {
		if ln != nil {
			ln.Close()
		}
	}
	s.wg.Wait()
	if s.payload != nil {
		s.payload.close()
	}
}

func addrOf(ln *net.TCPListener) netip.AddrPort {
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func (s *sinks) uploadAddr() netip.AddrPort   { return addrOf(s.upload) }
func (s *sinks) downloadAddr() netip.AddrPort { return addrOf(s.download) }

// echoAddr returns the echo listener for worker i.
func (s *sinks) echoAddr(i int) netip.AddrPort { return addrOf(s.echo[i%len(s.echo)]) }

// echoOnceAddr returns the listener that echoes one byte and closes, for
// worker i.
func (s *sinks) echoOnceAddr(i int) netip.AddrPort { return addrOf(s.echoOnce[i%len(s.echoOnce)]) }

func (s *sinks) serveUpload(c *net.TCPConn) {
	defer c.Close()
	n, err := readLength(c)
	if err != nil {
		return
	}
	if got, err := discard(c, n); err != nil || got != n {
		return
	}
	c.Write([]byte{1})
}

func (s *sinks) serveDownload(c *net.TCPConn) {
	defer c.Close()
	n, err := readLength(c)
	if err != nil {
		return
	}
	s.payload.sendTo(c, n)
}

// serveEcho returns every byte it reads. It copies through a small buffer
// instead of splice(2), because idle tunnels of the memory measure would
// otherwise each pin a pipe.
func serveEcho(c *net.TCPConn) {
	defer c.Close()
	var buf [512]byte
	for {
		n, err := c.Read(buf[:])
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// serveEchoOnce returns one byte and closes. Because the sink closes
// first, TIME-WAIT sockets gather on the accepting sides (the sink, and
// iapd's client connections) and not on the connecting ones, where
// connect(2) would have to search past thousands of them for a free
// source port.
func serveEchoOnce(c *net.TCPConn) {
	defer c.Close()
	var buf [1]byte
	if _, err := io.ReadFull(c, buf[:]); err != nil {
		return
	}
	c.Write(buf[:])
}

func writeLength(c net.Conn, n int64) error {
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	_, err := c.Write(hdr[:])
	return err
}

func readLength(c net.Conn) (int64, error) {
	var hdr [8]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return 0, err
	}
	n := binary.BigEndian.Uint64(hdr[:])
	if n > 1<<50 {
		return 0, fmt.Errorf("transfer length %d out of range", n)
	}
	return int64(n), nil
}

// discard reads n bytes from c into /dev/null. The copy runs as splice(2)
// because *os.File.ReadFrom accepts an io.LimitedReader around a TCP
// connection. Each call opens its own /dev/null, since splice holds the
// destination's write lock for the whole transfer.
func discard(c *net.TCPConn, n int64) (int64, error) {
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		return 0, err
	}
	defer null.Close()
	return io.Copy(null, io.LimitReader(c, n))
}

// payload is an in-memory file (memfd_create(2)) to send from with
// sendfile(2). Each sender opens its own file description through /proc,
// so that concurrent senders do not share a file offset.
type payload struct {
	file *os.File
	path string // /proc path of file, to open further descriptions
	size int64
}

func newPayload(size int64) (*payload, error) {
	fd, err := unix.MemfdCreate("iapdbench-payload", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating payload file: %w", os.NewSyscallError("memfd_create", err))
	}
	f := os.NewFile(uintptr(fd), "iapdbench-payload")

	// Non-zero bytes, in case anything on the path compresses or skips
	// zero pages.
	block := make([]byte, 1<<20)
	for i := range block {
		block[i] = byte(i*7 + i>>8)
	}
	for written := int64(0); written < size; written += int64(len(block)) {
		if _, err := f.Write(block); err != nil {
			f.Close()
			return nil, fmt.Errorf("filling payload file: %w", err)
		}
	}
	return &payload{file: f, path: fmt.Sprintf("/proc/self/fd/%d", fd), size: size}, nil
}

func (p *payload) close() { p.file.Close() }

// sendTo writes n bytes of the payload to c with sendfile(2).
func (p *payload) sendTo(c *net.TCPConn, n int64) (int64, error) {
	f, err := os.Open(p.path)
	if err != nil {
		return 0, fmt.Errorf("opening payload file: %w", err)
	}
	defer f.Close()

	var sent int64
	for sent < n {
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return sent, err
		}
		chunk := min(n-sent, p.size)
		m, err := c.ReadFrom(io.LimitReader(f, chunk))
		sent += m
		if err != nil {
			return sent, err
		}
		if m < chunk {
			return sent, errors.New("payload file ended early")
		}
	}
	return sent, nil
}

// environment is the state every measure shares: the sinks, and the DNS
// server that the access point of iapd's policy uses.
type environment struct {
	sinks *sinks
	dns   *dnsServer
	dir   string // temporary directory for policy files
}

func newEnvironment() (*environment, error) {
	dir, err := os.MkdirTemp("", "iapdbench-")
	if err != nil {
		return nil, fmt.Errorf("creating temporary directory: %w", err)
	}
	env := &environment{dir: dir}
	if env.sinks, err = newSinks(); err != nil {
		env.close()
		return nil, err
	}
	if env.dns, err = startDNSServer(); err != nil {
		env.close()
		return nil, err
	}
	return env, nil
}

func (e *environment) close() {
	if e.sinks != nil {
		e.sinks.close()
	}
	if e.dns != nil {
		e.dns.close()
	}
	os.RemoveAll(e.dir)
}
