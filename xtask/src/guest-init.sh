#!/bin/busybox sh
# The guest's /init (xtask/src/guest.rs): mounts the host's root read-only over 9p with writable
# tmpfs where tests write, the kernel filesystems the agent needs, then runs $RESULTS/run.sh in
# the host root and powers off. Its exit status goes to $RESULTS/rc.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in /m/*.ko; do $B insmod "$m" || echo "init: insmod $m failed"; done
R=/newroot
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot $R \
    || { echo "init: no 9p root"; $B poweroff -f; }
# Writable, thrown away at power-off: overlays where the host's files are needed (/etc, /var,
# /root: passwd, ld.so.cache, rustup; /tmp: a workspace cloned there, as CI may), plain tmpfs
# where they are not (/run).
$B mount -t tmpfs ov /ov
for d in etc var root tmp; do
    $B mkdir -p /ov/$d/upper /ov/$d/work
    $B mount -t overlay overlay -o lowerdir=$R/$d,upperdir=/ov/$d/upper,workdir=/ov/$d/work $R/$d
done
$B mount -t tmpfs run $R/run -o mode=755
$B mkdir -p $R/run/rm-guest
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results $R/run/rm-guest
$B mount --move /proc $R/proc
$B mount --move /sys $R/sys
$B mount --move /dev $R/dev
$B mkdir -p $R/dev/pts $R/dev/shm
$B mount -t devpts devpts $R/dev/pts
$B mount -t tmpfs shm $R/dev/shm
$B ln -sf /proc/self/fd $R/dev/fd
$B ln -sf /proc/self/fd/0 $R/dev/stdin
$B ln -sf /proc/self/fd/1 $R/dev/stdout
$B ln -sf /proc/self/fd/2 $R/dev/stderr
$B mount -t bpf bpf $R/sys/fs/bpf
$B mount -t tracefs tracefs $R/sys/kernel/tracing
$B mount -t debugfs debugfs $R/sys/kernel/debug
$B mount -t securityfs securityfs $R/sys/kernel/security
$B mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
$B ip link set lo up
$B hostname guest
# PID 1 itself moves into the host root (exec, not a child): the kernel's module autoloading
# (`ip link add ... type veth` asks for veth) runs modprobe in PID 1's root, which must be the one
# with /sbin/modprobe and /lib/modules.
$B cp /bin/busybox $R/run/rm-busybox
exec $B chroot $R /bin/sh -c '
    ulimit -l unlimited
    export HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    export RESULTS=/run/rm-guest
    cd /
    /bin/bash $RESULTS/run.sh > $RESULTS/output 2>&1
    echo $? > $RESULTS/rc
    /run/rm-busybox sync
    /run/rm-busybox poweroff -f'
