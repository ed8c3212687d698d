package dns

import (
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
)

// watchLeaseDirs calls kick whenever a file is written, moved into or
// removed from a directory of the lease globs (inotify(7)). Directories
// that do not exist are skipped. It returns a function that stops
// watching.
func watchLeaseDirs(globs []string, kick func()) (func(), error) {
	var dirs []string
	for _, g := range globs {
		dir := filepath.Dir(g)
		if _, err := os.Stat(dir); err == nil && !slices.Contains(dirs, dir) {
			dirs = append(dirs, dir)
		}
	}
	if len(dirs) == 0 {
		return func() {}, nil
	}

	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, os.NewSyscallError("inotify_init1", err)
	}
	for _, dir := range dirs {
		if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CLOSE_WRITE|unix.IN_MOVED_TO|unix.IN_DELETE|unix.IN_CREATE); err != nil {
			unix.Close(fd)
			return nil, os.NewSyscallError("inotify_add_watch "+dir, err)
		}
	}

	// A non-blocking descriptor makes the *os.File use the runtime poller,
	// so that Close interrupts a blocked Read.
	f := os.NewFile(uintptr(fd), "inotify")
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64*1024)
		for {
			if _, err := f.Read(buf); err != nil {
				return
			}
			kick()
		}
	}()
	return func() {
		f.Close()
		<-done
	}, nil
}
