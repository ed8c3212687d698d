package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// runProfile starts iapd with net/http/pprof on loopback and saves its
// CPU profile and allocation profiles while the bulk workload, then the
// connection setup workload, run through opts.profileMode. It measures
// nothing itself, because profiling slows iapd down.
func runProfile(ctx context.Context, opts *options, stderr io.Writer) error {
	m, err := modeByName(opts.profileMode)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(opts.profileDir, 0o755); err != nil {
		return fmt.Errorf("creating profile directory: %w", err)
	}
	env, err := newEnvironment(opts.ends)
	if err != nil {
		return err
	}
	defer env.close()

	d, err := startIapd(ctx, opts.iapdPath, env, true)
	if err != nil {
		return err
	}
	defer d.stop()
	if err := waitForPprof(ctx, d); err != nil {
		return err
	}

	c := clientFor(m, d)
	total := int64(opts.bulkMiB) << 20
	workloads := []struct {
		name string
		step func() error // one unit of work, repeated until the profile ends
	}{
		{"bulk", func() error {
			for _, dir := range []direction{upload, download} {
				for _, streams := range []int{1, opts.streams} {
					if _, err := runBulk(ctx, c, env, dir, streams, total); err != nil {
						return fmt.Errorf("bulk %s with %d streams: %w", dir, streams, err)
					}
				}
			}
			return nil
		}},
		{"setup", func() error {
			sr := runSetup(ctx, c, env.sinks, opts.setupWorkers, time.Second)
			if sr.conns == 0 {
				return fmt.Errorf("connection setup: no connection completed: %w", sr.firstErr)
			}
			return nil
		}},
	}

	for _, w := range workloads {
		fmt.Fprintf(stderr, "profiling %s through %s for %s\n", w.name, m.Name, opts.profileDuration)
		if err := profileWorkload(ctx, d, opts.profileDir, w.name, opts.profileDuration, w.step); err != nil {
			return withIapdState(fmt.Errorf("profiling %s: %w", w.name, err), d)
		}
	}

	dir := opts.profileDir
	fmt.Fprintf(stderr, "saved profiles in %s; read them with, for example:\n", dir)
	fmt.Fprintf(stderr, "  go tool pprof -top %s %s\n", opts.iapdPath, filepath.Join(dir, "bulk-cpu.pprof"))
	fmt.Fprintf(stderr, "  go tool pprof -top -sample_index=alloc_space -base %s %s %s\n",
		filepath.Join(dir, "setup-allocs-before.pprof"), opts.iapdPath, filepath.Join(dir, "setup-allocs-after.pprof"))
	return nil
}

// profileWorkload saves NAME-allocs-before.pprof, then NAME-cpu.pprof
// covering duration while step runs over and over, then
// NAME-allocs-after.pprof. The allocation profiles count from iapd's
// start; pprof's -base option subtracts the first from the second.
func profileWorkload(ctx context.Context, d *iapd, dir, name string, duration time.Duration, step func() error) error {
	if err := saveProfile(ctx, d, "/debug/pprof/allocs", filepath.Join(dir, name+"-allocs-before.pprof")); err != nil {
		return err
	}

	cpuDone := make(chan error, 1)
	go func() {
		path := fmt.Sprintf("/debug/pprof/profile?seconds=%d", max(1, int(duration.Round(time.Second)/time.Second)))
		cpuDone <- saveProfile(ctx, d, path, filepath.Join(dir, name+"-cpu.pprof"))
	}()

	// The last step may run past the end of the CPU profile; it is not in
	// the CPU profile but is in the allocation profile.
	for {
		select {
		case err := <-cpuDone:
			if err != nil {
				return err
			}
			return saveProfile(ctx, d, "/debug/pprof/allocs", filepath.Join(dir, name+"-allocs-after.pprof"))
		default:
		}
		if err := step(); err != nil {
			return err
		}
	}
}

// pprofStartTimeout bounds how long after its ready record iapd may take
// to serve net/http/pprof.
const pprofStartTimeout = 3 * time.Second

func waitForPprof(ctx context.Context, d *iapd) error {
	deadline := time.Now().Add(pprofStartTimeout)
	for {
		err := fetchProfile(ctx, d, "/debug/pprof/", io.Discard)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%w: %w", errNoPprof, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func saveProfile(ctx context.Context, d *iapd, path, file string) error {
	f, err := os.Create(file)
	if err != nil {
		return fmt.Errorf("creating profile file: %w", err)
	}
	if err := fetchProfile(ctx, d, path, f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// fetchProfile copies the body of one net/http/pprof endpoint to w.
func fetchProfile(ctx context.Context, d *iapd, path string, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.pprof+path, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("fetching %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetching %s: status %s", path, resp.Status)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("fetching %s: %w", path, err)
	}
	return nil
}
