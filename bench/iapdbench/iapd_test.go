package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIsReadyRecord(t *testing.T) {
	tests := []struct {
		name string
		line string
		want bool
	}{
		{name: "text at end", line: `time=2026-01-01T00:00:00Z level=INFO msg=ready`, want: true},
		{name: "text with attributes", line: `time=2026-01-01T00:00:00Z level=INFO msg=ready listeners=3`, want: true},
		{name: "json", line: `{"time":"2026-01-01T00:00:00Z","level":"INFO","msg":"ready","listeners":3}`, want: true},
		{name: "other message", line: `time=2026-01-01T00:00:00Z level=INFO msg=ready_soon`, want: false},
		{name: "quoted message", line: `time=2026-01-01T00:00:00Z level=INFO msg="not ready"`, want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := isReadyRecord([]byte(tt.line)); got != tt.want {
				t.Errorf("isReadyRecord(%q) = %v, want %v", tt.line, got, tt.want)
			}
		})
	}
}

// TestStartIapdFailure checks that a daemon that dies at start is reported
// with its output.
func TestStartIapdFailure(t *testing.T) {
	env, err := newEnvironment(endsCopy)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(env.close)

	fake := filepath.Join(t.TempDir(), "iapd")
	script := "#!/bin/sh\necho 'policy.yaml:3: invalid listen address' >&2\nexit 1\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		path    string
		wantErr []string
	}{
		{name: "exits at start", path: fake, wantErr: []string{"iapd exited before it was ready (exit status 1)", "policy.yaml:3: invalid listen address"}},
		{name: "missing binary", path: filepath.Join(t.TempDir(), "none"), wantErr: []string{"build it with make build, or pass -iapd"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := startIapd(context.Background(), tt.path, env, false)
			if err == nil {
				d.stop()
				t.Fatal("startIapd succeeded, want error")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error = %q, want it to contain %q", err, want)
				}
			}
		})
	}
}

func TestTailBuffer(t *testing.T) {
	tb := newTailBuffer(8)
	tb.Write([]byte("0123"))
	tb.Write([]byte("456789ab"))
	if got, want := tb.String(), "[earlier output dropped]\n456789ab"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestProcReaders(t *testing.T) {
	pid := os.Getpid()
	if _, err := processCPU(pid); err != nil {
		t.Errorf("processCPU: %v", err)
	}
	m, err := processMemory(pid)
	if err != nil {
		t.Fatalf("processMemory: %v", err)
	}
	if m.RSS <= 0 || m.PSS <= 0 {
		t.Errorf("memory = %+v, want positive RSS and PSS", m)
	}
	if n, err := processThreads(pid); err != nil || n < 1 {
		t.Errorf("processThreads = %d, %v; want at least 1", n, err)
	}
	if _, err := processCPU(-1); err == nil || !strings.Contains(err.Error(), "reading CPU time of process -1") {
		t.Errorf("processCPU(-1) error = %v, want a read error", err)
	}
}
