package proxy

import (
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
