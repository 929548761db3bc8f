package rollout

import (
	"os"
	"syscall"
	"time"
)

func sysID(st os.FileInfo) (dev, ino uint64, ctime time.Time, ok bool) {
	s, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, time.Time{}, false
	}
	return uint64(s.Dev), uint64(s.Ino), time.Unix(int64(s.Ctim.Sec), int64(s.Ctim.Nsec)), true
}
