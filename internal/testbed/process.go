package testbed

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
)

// Process stands in for a testing.TB outside tests, so that a program can
// build a bed with the same code as the tests. It implements the methods
// the bed calls: Helper, Log, Logf, Error, Errorf, Fatal, Fatalf, Skip,
// Skipf, Cleanup, TempDir, Name and Failed; any other method of
// testing.TB panics. Fatal and Skip stop only a function run by Run.
type Process struct {
	testing.TB // nil; present because testing.TB cannot be implemented otherwise

	name string
	log  io.Writer

	mu       sync.Mutex // protects the fields below
	root     string     // parent of every TempDir, "" until the first
	cleanups []func()
	errs     []error
}

// processFatal is the panic value of Fatal, recovered by Run and Close.
type processFatal struct{ msg string }

// NewProcess returns a Process called name whose Log output goes to log.
func NewProcess(name string, log io.Writer) *Process {
	return &Process{name: name, log: log}
}

// Run calls fn and returns the message of the Fatal or Skip that stopped
// it, or nil when fn returned.
func (p *Process) Run(fn func()) (err error) {
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(processFatal)
			if !ok {
				panic(r)
			}
			err = errors.New(f.msg)
		}
	}()
	fn()
	return nil
}

// Close runs the cleanup functions, last registered first, then removes
// the temporary directories. It returns every error reported through
// Error or Fatal, during cleanup or before.
func (p *Process) Close() error {
	for {
		p.mu.Lock()
		n := len(p.cleanups)
		if n == 0 {
			p.mu.Unlock()
			break
		}
		fn := p.cleanups[n-1]
		p.cleanups = p.cleanups[:n-1]
		p.mu.Unlock()
		if err := p.Run(fn); err != nil {
			p.record(err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.root != "" {
		if err := os.RemoveAll(p.root); err != nil {
			p.errs = append(p.errs, fmt.Errorf("removing temporary directory: %w", err))
		}
		p.root = ""
	}
	return errors.Join(p.errs...)
}

func (p *Process) record(err error) {
	p.mu.Lock()
	p.errs = append(p.errs, err)
	p.mu.Unlock()
}

func (p *Process) Helper()      {}
func (p *Process) Name() string { return p.name }

func (p *Process) Failed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.errs) > 0
}

func (p *Process) Log(args ...any) { fmt.Fprintln(p.log, args...) }

func (p *Process) Logf(format string, args ...any) {
	fmt.Fprintf(p.log, format+"\n", args...)
}

func (p *Process) Error(args ...any) { p.record(errors.New(fmt.Sprint(args...))) }

func (p *Process) Errorf(format string, args ...any) {
	p.record(fmt.Errorf(format, args...))
}

func (p *Process) Fatal(args ...any) { panic(processFatal{fmt.Sprint(args...)}) }

func (p *Process) Fatalf(format string, args ...any) {
	panic(processFatal{fmt.Sprintf(format, args...)})
}

func (p *Process) Skip(args ...any) { p.Fatal(args...) }

func (p *Process) Skipf(format string, args ...any) { p.Fatalf(format, args...) }

func (p *Process) Cleanup(fn func()) {
	p.mu.Lock()
	p.cleanups = append(p.cleanups, fn)
	p.mu.Unlock()
}

// TempDir returns a new directory on each call, as testing.T's does;
// Close removes them all.
func (p *Process) TempDir() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.root == "" {
		root, err := os.MkdirTemp("", p.name+"-")
		if err != nil {
			panic(processFatal{fmt.Sprintf("creating temporary directory: %v", err)})
		}
		p.root = root
	}
	dir, err := os.MkdirTemp(p.root, "")
	if err != nil {
		panic(processFatal{fmt.Sprintf("creating temporary directory: %v", err)})
	}
	return dir
}
