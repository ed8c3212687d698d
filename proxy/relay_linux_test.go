package proxy

import (
	"bytes"
	"io"
	"testing"
	"time"
)

// setPipeIdleTimeout sets pipeIdleTimeout for one test and restores it in
// t.Cleanup. Tests that call it must not run in parallel.
func setPipeIdleTimeout(t *testing.T, d time.Duration) {
	t.Helper()
	old := pipeIdleTimeout
	pipeIdleTimeout = d
	t.Cleanup(func() { pipeIdleTimeout = old })
}

// TestPipePoolClosesIdlePipes checks that pipes returned to the pool are
// closed once they have been idle for pipeIdleTimeout, so that a daemon
// holds no pipe after its traffic has stopped.
func TestPipePoolClosesIdlePipes(t *testing.T) {
	setPipeIdleTimeout(t, 50*time.Millisecond)
	// Pipes that earlier tests returned wait for the timer they set;
	// closing the stale ones now applies the short timeout to them.
	waitFor(t, "pipes of earlier tests to close", func() bool {
		pipes.closeStale()
		return pipes.open.Load() == 0
	})

	var taken []*relayPipe
	for range 3 {
		p, err := pipes.get()
		if err != nil {
			t.Fatalf("get: %v", err)
		}
		taken = append(taken, p)
	}
	if n := pipes.open.Load(); n != 3 {
		t.Fatalf("%d pipes open after taking 3, want 3", n)
	}
	for _, p := range taken {
		pipes.put(p)
	}
	if n := pipesInUse(); n != 0 {
		t.Errorf("%d pipes in use after returning all, want 0", n)
	}

	waitFor(t, "the idle pipes to close", func() bool { return pipes.open.Load() == 0 })
	pipes.mu.Lock()
	idle, timer := len(pipes.free), pipes.trim
	pipes.mu.Unlock()
	if idle != 0 {
		t.Errorf("%d pipes left in the pool, want 0", idle)
	}
	if timer != nil {
		t.Error("the pool keeps a timer with no pipe to close")
	}
}

// TestRelaySmallPiecesThenBulk checks that a tunnel copies small pieces
// through the buffer, without a pipe, and splices once bytes come in bulk,
// delivering every byte in order either way.
func TestRelaySmallPiecesThenBulk(t *testing.T) {
	target := startHoldServer(t)
	_, addr := startServer(t, Config{Network: newFakeNetwork(t)}, testPolicy(t).Listeners[0])
	c := openTunnel(t, addr, target.addr)
	tc := target.accept(t)

	splicedBefore, copiedBefore := relayBytes.Spliced.Load(), relayBytes.Copied.Load()
	pipesBefore := pipes.open.Load()
	const pieces, pieceSize = 20, 100
	for i := range pieces {
		piece := bytes.Repeat([]byte{byte(i)}, pieceSize)
		if _, err := c.Write(piece); err != nil {
			t.Fatalf("client writing piece %d: %v", i, err)
		}
		if got := readExactly(t, tc, pieceSize); !bytes.Equal(got, piece) {
			t.Fatalf("target read piece %d as %v, want %v", i, got[:4], piece[:4])
		}
		if _, err := tc.Write(piece); err != nil {
			t.Fatalf("target writing piece %d: %v", i, err)
		}
		if got := readExactly(t, c, pieceSize); !bytes.Equal(got, piece) {
			t.Fatalf("client read piece %d as %v, want %v", i, got[:4], piece[:4])
		}
	}
	// The relay counts a piece after its write returns, which may be
	// just after the other end has read it.
	waitFor(t, "the pieces to be counted", func() bool {
		return relayBytes.Copied.Load()-copiedBefore >= 2*pieces*pieceSize
	})
	if n := relayBytes.Copied.Load() - copiedBefore; n != 2*pieces*pieceSize {
		t.Errorf("copied %d bytes through the buffer, want %d", n, 2*pieces*pieceSize)
	}
	if n := relayBytes.Spliced.Load() - splicedBefore; n != 0 {
		t.Errorf("spliced %d bytes of small pieces, want 0", n)
	}
	if n := pipes.open.Load() - pipesBefore; n > 0 {
		t.Errorf("small pieces opened %d pipes, want none", n)
	}

	payload := make([]byte, 8<<20)
	for i := range payload {
		payload[i] = byte(i * 13 / 7)
	}
	go tc.Write(payload)
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("reading bulk through tunnel: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("tunnel delivered different bulk bytes than the target wrote")
	}
	waitFor(t, "the bulk bytes to be counted", func() bool {
		return relayBytes.Spliced.Load()-splicedBefore+relayBytes.Copied.Load()-copiedBefore >= int64(len(payload))+2*pieces*pieceSize
	})
	spliced := relayBytes.Spliced.Load() - splicedBefore
	copied := relayBytes.Copied.Load() - copiedBefore - 2*pieces*pieceSize
	if spliced+copied != int64(len(payload)) {
		t.Errorf("bulk moved %d spliced and %d copied bytes, want %d in all", spliced, copied, len(payload))
	}
	if spliced < int64(len(payload))/2 {
		t.Errorf("bulk spliced only %d of %d bytes", spliced, len(payload))
	}
}
