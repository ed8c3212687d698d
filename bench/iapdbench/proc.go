package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// userHZ is the unit of the CPU times in /proc/PID/stat. The kernel
// reports them in USER_HZ, which is 100 on every Linux architecture Go
// supports; see proc(5).
const userHZ = 100

// processCPU returns the user plus system CPU time that process pid has
// used, from fields 14 and 15 of /proc/PID/stat (see proc(5)). Its
// resolution is 10 ms.
func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("reading CPU time of process %d: %w", pid, err)
	}
	// The command name in parentheses may hold spaces; fields are counted
	// after its closing parenthesis, where field 3 (state) starts.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return 0, fmt.Errorf("parsing /proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[end+1:]))
	const utimeIndex = 14 - 3
	if len(fields) <= utimeIndex+1 {
		return 0, fmt.Errorf("parsing /proc/%d/stat: %d fields after the command name", pid, len(fields))
	}
	var ticks uint64
	for _, f := range fields[utimeIndex : utimeIndex+2] {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// selfCPU returns the user plus system CPU time of this process, which
// runs the clients.
func selfCPU() (time.Duration, error) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, os.NewSyscallError("getrusage", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

// memoryUsage is a process's resident memory in KiB.
type memoryUsage struct {
	RSS int64 `json:"rss_kib"`
	PSS int64 `json:"pss_kib"`
}

// processMemory reads the Rss and Pss lines of /proc/PID/smaps_rollup
// (Linux 4.14 and later; see proc(5)).
func processMemory(pid int) (memoryUsage, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return memoryUsage{}, fmt.Errorf("reading memory of iapd: %w", err)
	}
	defer f.Close()

	var (
		m        memoryUsage
		found    int
		sc       = bufio.NewScanner(f)
		wantKeys = map[string]*int64{"Rss:": &m.RSS, "Pss:": &m.PSS}
	)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 || fields[2] != "kB" {
			continue
		}
		dst, ok := wantKeys[fields[0]]
		if !ok {
			continue
		}
		if *dst, err = strconv.ParseInt(fields[1], 10, 64); err != nil {
			return memoryUsage{}, fmt.Errorf("parsing /proc/%d/smaps_rollup: %w", pid, err)
		}
		found++
	}
	if err := sc.Err(); err != nil {
		return memoryUsage{}, fmt.Errorf("reading /proc/%d/smaps_rollup: %w", pid, err)
	}
	if found != len(wantKeys) {
		return memoryUsage{}, fmt.Errorf("parsing /proc/%d/smaps_rollup: no Rss or Pss line", pid)
	}
	return m, nil
}

// processThreads returns the number of threads of process pid. It is not
// the number of goroutines, which only the Go runtime inside iapd can count.
func processThreads(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, fmt.Errorf("counting threads of iapd: %w", err)
	}
	return len(entries), nil
}

// processFiles returns the number of open file descriptors of process pid.
func processFiles(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("counting file descriptors of iapd: %w", err)
	}
	return len(entries), nil
}

// processFileLimit returns the soft RLIMIT_NOFILE of process pid, from
// the "Max open files" line of /proc/PID/limits.
func processFileLimit(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, fmt.Errorf("reading limits of iapd: %w", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		rest, ok := strings.CutPrefix(line, "Max open files")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			break
		}
		if fields[0] == "unlimited" {
			return 1 << 30, nil
		}
		n, err := strconv.Atoi(fields[0])
		if err != nil {
			return 0, fmt.Errorf("parsing /proc/%d/limits: %w", pid, err)
		}
		return n, nil
	}
	return 0, fmt.Errorf("parsing /proc/%d/limits: no \"Max open files\" line", pid)
}

// kernelRelease returns the running kernel's release, as uname -r prints.
func kernelRelease() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return "unknown"
	}
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

// cpuModel returns the first "model name" of /proc/cpuinfo, or "".
func cpuModel() string {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if key, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(key) == "model name" {
			return strings.TrimSpace(value)
		}
	}
	return ""
}

// readSysctl returns the trimmed contents of a file under /proc/sys, or ""
// when it cannot be read.
func readSysctl(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.Join(strings.Fields(string(data)), " ")
}
