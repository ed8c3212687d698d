package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Sinks are the targets of every measure. They run in a child process of
// the benchmark, so that their CPU time is measured apart from the
// clients', and so that the benchmark process, the sinks and iapd each
// hold only their own descriptors of the idle tunnels.
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

// sinkAddrs are the listeners of the sinks.
type sinkAddrs struct {
	Upload   netip.AddrPort   `json:"upload"`
	Download netip.AddrPort   `json:"download"`
	Echo     []netip.AddrPort `json:"echo"`      // several ports, see echoPorts
	EchoOnce []netip.AddrPort `json:"echo_once"` // as Echo, but each closes after one byte
}

// echoAddr returns the echo listener for worker i.
func (a *sinkAddrs) echoAddr(i int) netip.AddrPort { return a.Echo[i%len(a.Echo)] }

// echoOnceAddr returns the listener that echoes one byte and closes, for
// worker i.
func (a *sinkAddrs) echoOnceAddr(i int) netip.AddrPort { return a.EchoOnce[i%len(a.EchoOnce)] }

// echoPorts is the number of listeners of each echo kind. Connections
// spread over several destination ports, so that more source ports are
// free for each destination.
const echoPorts = 4

// sinkServer is the set of sink listeners and their handlers.
type sinkServer struct {
	upload   *net.TCPListener
	download *net.TCPListener
	echo     []*net.TCPListener
	echoOnce []*net.TCPListener
	ends     *dataEnds

	wg sync.WaitGroup
}

// startSinkServer opens the sinks in this process. They move bulk data in
// the way that ends selects.
func startSinkServer(ends *dataEnds) (*sinkServer, error) {
	s := &sinkServer{ends: ends}
	listen := func() (*net.TCPListener, error) {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, fmt.Errorf("opening sink listener on 127.0.0.1: %w", err)
		}
		return ln, nil
	}
	var err error
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

func (s *sinkServer) serve(ln *net.TCPListener, handle func(*net.TCPConn)) {
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
func (s *sinkServer) close() {
	lns := append([]*net.TCPListener{s.upload, s.download}, s.echo...)
	for _, ln := range append(lns, s.echoOnce...) {
		if ln != nil {
			ln.Close()
		}
	}
	s.wg.Wait()
}

func addrOf(ln *net.TCPListener) netip.AddrPort {
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func (s *sinkServer) addrs() *sinkAddrs {
	a := &sinkAddrs{Upload: addrOf(s.upload), Download: addrOf(s.download)}
	for _, ln := range s.echo {
		a.Echo = append(a.Echo, addrOf(ln))
	}
	for _, ln := range s.echoOnce {
		a.EchoOnce = append(a.EchoOnce, addrOf(ln))
	}
	return a
}

func (s *sinkServer) serveUpload(c *net.TCPConn) {
	defer c.Close()
	n, err := readLength(c)
	if err != nil {
		return
	}
	if got, err := s.ends.receive(c, n); err != nil || got != n {
		return
	}
	c.Write([]byte{1})
}

func (s *sinkServer) serveDownload(c *net.TCPConn) {
	defer c.Close()
	n, err := readLength(c)
	if err != nil {
		return
	}
	s.ends.send(c, n)
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

// Ways of moving bulk data at the ends, the clients and the sinks.
const (
	// endsCopy writes from and reads into a buffer of ioBlockSize with
	// write(2) and read(2), as most applications do.
	endsCopy = "copy"
	// endsZeroCopy sends with sendfile(2) from an in-memory file and
	// receives with splice(2) into /dev/null, so that the ends copy no
	// byte themselves.
	endsZeroCopy = "zerocopy"
)

// ioBlockSize is the buffer of the copying ends: the default block size
// of iperf3 for TCP (128 KiB).
const ioBlockSize = 128 << 10

// dataEnds sends and receives the bytes of bulk transfers, in one of the
// ways above. It is safe for concurrent use.
type dataEnds struct {
	mode    string
	payload *payload // the file sendfile reads; zerocopy only
	block   []byte   // bytes every copying writer sends; copy only
	reads   sync.Pool
}

func newDataEnds(mode string) (*dataEnds, error) {
	e := &dataEnds{mode: mode}
	switch mode {
	case endsCopy:
		// Non-zero bytes, in case anything on the path compresses or
		// skips zero pages.
		e.block = make([]byte, ioBlockSize)
		for i := range e.block {
			e.block[i] = byte(i*7 + i>>8)
		}
		e.reads.New = func() any { return make([]byte, ioBlockSize) }
	case endsZeroCopy:
		p, err := newPayload(payloadSize)
		if err != nil {
			return nil, err
		}
		e.payload = p
	default:
		return nil, fmt.Errorf("unknown ends %q: use %s or %s", mode, endsCopy, endsZeroCopy)
	}
	return e, nil
}

func (e *dataEnds) close() {
	if e.payload != nil {
		e.payload.close()
	}
}

// send writes n bytes to c.
func (e *dataEnds) send(c *net.TCPConn, n int64) (int64, error) {
	if e.payload != nil {
		return e.payload.sendTo(c, n)
	}
	var sent int64
	for sent < n {
		m, err := c.Write(e.block[:min(n-sent, int64(len(e.block)))])
		sent += int64(m)
		if err != nil {
			return sent, err
		}
	}
	return sent, nil
}

// receive reads and discards n bytes from c, or fewer when c ends first.
func (e *dataEnds) receive(c *net.TCPConn, n int64) (int64, error) {
	if e.payload != nil {
		return discard(c, n)
	}
	buf := e.reads.Get().([]byte)
	defer e.reads.Put(buf)
	var got int64
	for got < n {
		m, err := c.Read(buf[:min(n-got, int64(len(buf)))])
		got += int64(m)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
	return got, nil
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

// payloadSize is the size of the in-memory file that zero-copy senders
// send from; larger transfers send it repeatedly.
const payloadSize = 32 << 20

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

// sinkChildEnv, set to the ends mode, makes the benchmark's binary run the
// sinks as the child process of another run of it (see startSinkProcess).
const sinkChildEnv = "IAPDBENCH_SINKS"

// runSinkChild serves the sinks, writes their addresses as one JSON line
// to stdout and serves until stdin closes, which happens when the parent
// exits or stops the child.
func runSinkChild(mode string) int {
	ends, err := newDataEnds(mode)
	if err != nil {
		fmt.Fprintln(os.Stderr, "iapdbench sinks:", err)
		return 1
	}
	defer ends.close()
	s, err := startSinkServer(ends)
	if err != nil {
		fmt.Fprintln(os.Stderr, "iapdbench sinks:", err)
		return 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(s.addrs()); err != nil {
		fmt.Fprintln(os.Stderr, "iapdbench sinks:", err)
		return 1
	}
	io.Copy(io.Discard, os.Stdin)
	s.close()
	return 0
}

// sinkProcess is the child process that serves the sinks.
type sinkProcess struct {
	cmd   *exec.Cmd
	pid   int
	stdin io.WriteCloser
	addrs *sinkAddrs
	done  chan struct{} // closed when the child has exited
}

// sinkStartTimeout bounds how long the child may take to open its sinks.
const sinkStartTimeout = 10 * time.Second

// startSinkProcess starts this program again as the sink process, moving
// bulk data in the given ends mode, and waits for its addresses. The child
// inherits this process's RLIMIT_NOFILE.
func startSinkProcess(mode string) (*sinkProcess, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding own executable for the sink process: %w", err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), sinkChildEnv+"="+mode)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("starting sink process: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("starting sink process: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting sink process: %w", err)
	}
	p := &sinkProcess{cmd: cmd, pid: cmd.Process.Pid, stdin: stdin, done: make(chan struct{})}

	type decoded struct {
		addrs *sinkAddrs
		err   error
	}
	got := make(chan decoded, 1)
	go func() {
		var a sinkAddrs
		err := json.NewDecoder(bufio.NewReader(stdout)).Decode(&a)
		got <- decoded{&a, err}
		io.Copy(io.Discard, stdout)
		cmd.Wait()
		close(p.done)
	}()
	select {
	case d := <-got:
		if d.err != nil {
			p.stop()
			return nil, fmt.Errorf("reading the sink process's addresses: %w", d.err)
		}
		if len(d.addrs.Echo) == 0 || len(d.addrs.EchoOnce) == 0 {
			p.stop()
			return nil, errors.New("the sink process reported no echo listeners")
		}
		p.addrs = d.addrs
		return p, nil
	case <-time.After(sinkStartTimeout):
		p.stop()
		return nil, fmt.Errorf("the sink process did not report its addresses within %s", sinkStartTimeout)
	}
}

// stop closes the child's stdin, which ends it, and kills it if it has not
// exited within a few seconds.
func (p *sinkProcess) stop() {
	p.stdin.Close()
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// environment is the state every measure shares: the sinks, the clients'
// way of moving bulk data, and the DNS server that the access point of
// iapd's policy uses.
type environment struct {
	sinks     *sinkAddrs
	sinkPID   int    // the process that runs the sinks
	stopSinks func() // nil until the sinks run
	ends      *dataEnds
	dns       *dnsServer
	dir       string // temporary directory for policy files
}

// newEnvironment starts the sinks in a child process and the DNS server
// here. Clients and sinks move bulk data in the given ends mode.
func newEnvironment(mode string) (*environment, error) {
	dir, err := os.MkdirTemp("", "iapdbench-")
	if err != nil {
		return nil, fmt.Errorf("creating temporary directory: %w", err)
	}
	env := &environment{dir: dir}
	if env.ends, err = newDataEnds(mode); err != nil {
		env.close()
		return nil, err
	}
	p, err := startSinkProcess(mode)
	if err != nil {
		env.close()
		return nil, err
	}
	env.sinks, env.sinkPID, env.stopSinks = p.addrs, p.pid, p.stop
	if env.dns, err = startDNSServer(); err != nil {
		env.close()
		return nil, err
	}
	return env, nil
}

func (e *environment) close() {
	if e.stopSinks != nil {
		e.stopSinks()
	}
	if e.ends != nil {
		e.ends.close()
	}
	if e.dns != nil {
		e.dns.close()
	}
	os.RemoveAll(e.dir)
}
