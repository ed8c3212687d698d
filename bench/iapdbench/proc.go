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
	st, err := readStat(pid)
	if err != nil {
		return 0, err
	}
	return st.utime + st.stime, nil
}

// treeCPU returns the CPU time of process root and of every process
// below it. Running processes count with their user and system time.
// Ended processes count once their parent has waited for them, because
// the kernel then adds their time to the parent's cutime and cstime.
func treeCPU(root int) (time.Duration, error) {
	tree, err := processTree(root)
	if err != nil {
		return 0, err
	}
	var total time.Duration
	for _, st := range tree {
		total += st.utime + st.stime + st.cutime + st.cstime
	}
	return total, nil
}

// treeUsage is the memory, descriptors and threads of a process tree.
type treeUsage struct {
	mem              memoryUsage // RSS counts shared pages once per process; PSS shares them out
	files, processes int
	threads          int
}

// readTreeUsage adds up the usage of process root and every process
// below it.
func readTreeUsage(root int) (treeUsage, error) {
	tree, err := processTree(root)
	if err != nil {
		return treeUsage{}, err
	}
	var u treeUsage
	for pid := range tree {
		m, err := processMemory(pid)
		if err != nil {
			return u, err
		}
		files, err := processFiles(pid)
		if err != nil {
			return u, err
		}
		threads, err := processThreads(pid)
		if err != nil {
			return u, err
		}
		u.mem.RSS += m.RSS
		u.mem.PSS += m.PSS
		u.files += files
		u.threads += threads
		u.processes++
	}
	return u, nil
}

// processTree returns the stat of process root and of every process below
// it, keyed by pid.
func processTree(root int) (map[int]procStat, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("listing the processes below %d: %w", root, err)
	}
	stats := make(map[int]procStat)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readStat(pid); err == nil {
			stats[pid] = st
		}
	}
	if _, ok := stats[root]; !ok {
		return nil, fmt.Errorf("reading process %d: it has exited", root)
	}

	tree := make(map[int]procStat)
	for pid, st := range stats {
		if descends(stats, pid, root) {
			tree[pid] = st
		}
	}
	return tree, nil
}

// descends reports whether pid is root or below it.
func descends(stats map[int]procStat, pid, root int) bool {
	for range len(stats) { // a bound, in case the snapshot holds a loop
		if pid == root {
			return true
		}
		st, ok := stats[pid]
		if !ok || st.ppid <= 1 {
			return false
		}
		pid = st.ppid
	}
	return false
}

// procStat holds the fields of /proc/PID/stat that the benchmark reads.
type procStat struct {
	ppid                         int
	utime, stime, cutime, cstime time.Duration
}

// readStat parses /proc/PID/stat: field 4 (ppid) and fields 14 to 17
// (utime, stime, cutime, cstime); see proc(5).
func readStat(pid int) (procStat, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, fmt.Errorf("reading CPU time of process %d: %w", pid, err)
	}
	// The command name in parentheses may hold spaces; fields are counted
	// after its closing parenthesis, where field 3 (state) starts.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return procStat{}, fmt.Errorf("parsing /proc/%d/stat: no command name", pid)
	}
	fields := strings.Fields(string(data[end+1:]))
	const first = 3
	if len(fields) <= 17-first {
		return procStat{}, fmt.Errorf("parsing /proc/%d/stat: %d fields after the command name", pid, len(fields))
	}
	var nums [18]int64
	for _, i := range []int{4, 14, 15, 16, 17} {
		n, err := strconv.ParseInt(fields[i-first], 10, 64)
		if err != nil {
			return procStat{}, fmt.Errorf("parsing /proc/%d/stat: field %d: %w", pid, i, err)
		}
		nums[i] = n
	}
	ticks := func(n int64) time.Duration { return time.Duration(n) * time.Second / userHZ }
	return procStat{
		ppid:   int(nums[4]),
		utime:  ticks(nums[14]),
		stime:  ticks(nums[15]),
		cutime: ticks(nums[16]),
		cstime: ticks(nums[17]),
	}, nil
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
		return memoryUsage{}, fmt.Errorf("reading memory of process %d: %w", pid, err)
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
		return 0, fmt.Errorf("counting threads of process %d: %w", pid, err)
	}
	return len(entries), nil
}

// processFiles returns the number of open file descriptors of process pid.
func processFiles(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("counting file descriptors of process %d: %w", pid, err)
	}
	return len(entries), nil
}

// processFileLimit returns the soft RLIMIT_NOFILE of process pid, from
// the "Max open files" line of /proc/PID/limits.
func processFileLimit(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, fmt.Errorf("reading limits of process %d: %w", pid, err)
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
