package proxy

import (
	"bytes"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// lowestFreeFD returns the lowest file descriptor number not in use, which
// is the one the next accept takes.
func lowestFreeFD(t *testing.T) int {
	t.Helper()
	dir, err := os.Open("/proc/self/fd")
	if err != nil {
		t.Fatalf("listing open file descriptors: %v", err)
	}
	own := int(dir.Fd())
	names, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		t.Fatalf("listing open file descriptors: %v", err)
	}
	used := map[int]bool{}
	for _, name := range names {
		if n, err := strconv.Atoi(name); err == nil && n != own {
			used[n] = true
		}
	}
	fd := 0
	for used[fd] {
		fd++
	}
	return fd
}

// waitFDsSettled waits until the number of open descriptors stays the same
// for 100ms, so that earlier tests' connections have finished closing.
func waitFDsSettled(t *testing.T) {
	t.Helper()
	count := func() int {
		names, _ := os.ReadDir("/proc/self/fd")
		return len(names)
	}
	deadline := time.Now().Add(5 * time.Second)
	last := count()
	for time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		n := count()
		if n == last {
			return
		}
		last = n
	}
}

// TestAcceptEMFILE runs the server out of file descriptors for real, by
// lowering the process's RLIMIT_NOFILE (getrlimit(2)) to the descriptor
// that the next accept needs. The accept loop must back off instead of
// spinning, and serve the waiting clients once descriptors are back.
func TestAcceptEMFILE(t *testing.T) {
	echo := startEchoServer(t, "tcp4")
	network := newFakeNetwork(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listening: %v", err)
	}
	gated := &gatedListener{Listener: ln, open: make(chan struct{})}
	s := NewServer(Config{Network: network, Logger: newTestLogger(t)})
	served := make(chan error, 1)
	go func() { served <- s.Serve(gated, testPolicy(t).Listeners[0]) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	// The clients wait in the kernel's backlog while the gate is shut.
	var clients []*net.TCPConn
	for i := range 3 {
		c := dialProxy(t, ln.Addr().String())
		c.Write(slices.Concat(greeting(methodNoAuth), request(t, 1, echo), []byte("client "+strconv.Itoa(i))))
		c.CloseWrite()
		clients = append(clients, c)
	}

	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatalf("getrlimit: %v", err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
			t.Fatalf("restoring RLIMIT_NOFILE: %v", err)
		}
	}
	waitFDsSettled(t)
	low := saved
	low.Cur = uint64(lowestFreeFD(t))
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatalf("setrlimit: %v", err)
	}
	t.Cleanup(restore)
	// Fill any descriptor that was freed since, so that the next accept
	// surely finds none.
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			break
		}
		t.Cleanup(func() { f.Close() })
	}

	close(gated.open)
	// The time to watch the loop out of descriptors; it must not spin.
	time.Sleep(400 * time.Millisecond)
	retries := s.Stats().AcceptRetries
	restore()
	if retries == 0 || retries > 12 {
		t.Errorf("%d accept retries in 400ms without descriptors, want 1 to 12", retries)
	}

	for i, c := range clients {
		got, err := io.ReadAll(c)
		if err != nil {
			t.Errorf("client %d: reading: %v", i, err)
		}
		head := []byte{5, methodNoAuth, 5, replySucceeded, 0, 1}
		tail := []byte("echo:client " + strconv.Itoa(i))
		if !bytes.HasPrefix(got, head) || !bytes.HasSuffix(got, tail) {
			t.Errorf("client %d read % x, want the SOCKS5 replies and %q", i, got, tail)
		}
	}
}
