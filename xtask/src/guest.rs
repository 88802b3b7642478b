//! Other kernels: boots one of Debian's kernels under QEMU (software emulation: this machine's
//! KVM cannot run stock kernels) with the host's `/` shared read-only, and runs a shell script
//! there. Recipe and measurements: `docs/sensors.md#kernel-matrix`.
//!
//! The guest boots the uncompressed `vmlinux` (extracted from Debian's bzImage; their kernels have
//! `CONFIG_PVH=y`, so QEMU enters it directly and skips the decompressor) with `qboot`, and a
//! small initramfs: busybox-static as `/init` and the kernel's own 9p and overlay modules. The
//! host root is mounted over 9p, writable tmpfs (overlays) go over `/tmp`, `/run`, `/var`,
//! `/etc` and `/root`, and a second, writable 9p share (the run directory) carries the script in
//! and its output and exit status out.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::common::{output, say};

/// A kernel a guest can boot: its bzImage and the release its modules are installed under.
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    /// What the user called it (`6.1`, `6.12`, a path).
    pub name: String,
    pub release: String,
    pub vmlinuz: PathBuf,
}

/// The kernels of the matrix besides the host's: Debian 12's own (`linux-image-amd64`) and the
/// bookworm backport of 6.12 (`linux-image-6.12-amd64`); `cargo xtask setup` installs both.
pub(crate) const MATRIX: [&str; 2] = ["6.1", "6.12"];

/// `6.1`, `6.12` (the newest installed Debian kernel of that line), a release (`6.1.0-41-amd64`)
/// or a path to a `vmlinuz-RELEASE` whose modules are in `/lib/modules/RELEASE`.
pub(crate) fn resolve(spec: &str) -> anyhow::Result<Kernel> {
    let vmlinuz = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        let (prefix, suffix) = match spec {
            "6.1" => ("vmlinuz-6.1.0-", "-amd64"),
            "6.12" => ("vmlinuz-6.12.", "+deb12-amd64"),
            release => {
                let path = PathBuf::from(format!("/boot/vmlinuz-{release}"));
                return kernel_at(spec, &path);
            }
        };
        let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
            })
            .collect();
        // The highest ABI number last ("6.1.0-9" < "6.1.0-41": compare the numbers).
        found.sort_by_key(|p| version_key(&p.display().to_string()));
        found.pop().with_context(|| {
            format!(
                "no /boot/{prefix}*{suffix}: `cargo xtask setup` installs Debian's kernel {spec}"
            )
        })?
    };
    kernel_at(spec, &vmlinuz)
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn kernel_at(name: &str, vmlinuz: &Path) -> anyhow::Result<Kernel> {
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .with_context(|| format!("{}: not a vmlinuz-RELEASE file", vmlinuz.display()))?
        .to_owned();
    if !vmlinuz.is_file() {
        bail!("{}: no such kernel", vmlinuz.display());
    }
    if !Path::new("/lib/modules").join(&release).is_dir() {
        bail!(
            "/lib/modules/{release} is missing: the guest needs the kernel's 9p and overlay modules"
        );
    }
    Ok(Kernel {
        name: name.to_owned(),
        release,
        vmlinuz: vmlinuz.to_owned(),
    })
}

/// Where the extracted `vmlinux` and the initramfs of each kernel are kept.
fn cache_dir(release: &str) -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home)
        .join(".cache/runner-monitor/guest")
        .join(release)
}

/// The `vmlinux` and initramfs of `kernel`, made once and kept in the cache.
pub(crate) fn prepare(kernel: &Kernel) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = cache_dir(&kernel.release);
    let vmlinux = dir.join("vmlinux");
    // The init script and module list are part of the name: a changed one makes a new image.
    let recipe = format!("{INIT}{MODULES:?}");
    let fnv = recipe.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let initramfs = dir.join(format!("initramfs-{fnv:016x}.cpio"));
    std::fs::create_dir_all(&dir)?;
    if !vmlinux.exists() {
        say(&format!(
            "extracting the {} vmlinux into {}",
            kernel.release,
            dir.display()
        ));
        std::fs::write(dir.join("vmlinux.tmp"), extract_vmlinux(&kernel.vmlinuz)?)?;
        std::fs::rename(dir.join("vmlinux.tmp"), &vmlinux)?;
    }
    if !initramfs.exists() {
        say(&format!("making the {} guest's initramfs", kernel.release));
        std::fs::write(dir.join("initramfs.tmp"), initramfs_for(&kernel.release)?)?;
        std::fs::rename(dir.join("initramfs.tmp"), &initramfs)?;
    }
    Ok((vmlinux, initramfs))
}

/// The ELF kernel inside a bzImage: the compressed payload the setup header points at
/// (`payload_offset`, `payload_length`, boot protocol 2.08+), decompressed.
fn extract_vmlinux(bzimage: &Path) -> anyhow::Result<Vec<u8>> {
    let image = std::fs::read(bzimage)?;
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let setup_sects = match image.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => bail!("{}: too short for a bzImage", bzimage.display()),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        bail!("{}: no setup header", bzimage.display());
    };
    let start = (setup_sects + 1) * 512 + offset;
    let payload = image
        .get(start..start + length)
        .with_context(|| format!("{}: payload out of bounds", bzimage.display()))?;
    let tool = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x1f, 0x8b, ..] => "gzip",
        _ => bail!(
            "{}: payload compressed in a format this does not know",
            bzimage.display()
        ),
    };
    let elf = decompress(tool, payload)?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("{}: the payload is not an ELF kernel", bzimage.display());
    }
    Ok(elf)
}

/// `tool -dc` over `data`. The payload may carry trailing bytes (its size is appended): the
/// output is judged, not the exit status.
fn decompress(tool: &str, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new(tool)
        .args(["-dc"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    Ok(out.stdout)
}

/// The modules the guest's init loads, in dependency order.
const MODULES: [&str; 4] = ["virtio_pci", "9pnet_virtio", "9p", "overlay"];

const INIT: &str = include_str!("guest-init.sh");

/// An initramfs (newc cpio, uncompressed): busybox, `/init`, and the modules `MODULES` need
/// (`modprobe --show-depends` gives them in load order).
fn initramfs_for(release: &str) -> anyhow::Result<Vec<u8>> {
    let deps = output(
        Command::new("modprobe")
            .args(["-a", "-S", release, "--show-depends"])
            .args(MODULES),
    )
    .with_context(|| format!("modprobe --show-depends for {release}"))?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "m", "proc", "sys", "dev", "newroot", "ov"] {
        cpio.dir(dir);
    }
    cpio.file(
        "bin/busybox",
        &std::fs::read("/bin/busybox").context("busybox-static: /bin/busybox")?,
        0o755,
    );
    cpio.file("init", INIT.as_bytes(), 0o755);
    let mut seen = Vec::new();
    for line in deps.lines() {
        // "insmod /lib/modules/R/kernel/fs/9p/9p.ko.xz " or "builtin virtio_pci"
        let Some(path) = line.strip_prefix("insmod ") else {
            continue;
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if seen.iter().any(|s| s == path) {
            continue;
        }
        seen.push(path.to_owned());
        let raw = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let module = if path.ends_with(".xz") {
            decompress("xz", &raw)?
        } else if path.ends_with(".zst") {
            decompress("zstd", &raw)?
        } else {
            raw
        };
        cpio.file(&format!("m/{:02}.ko", seen.len()), &module, 0o644);
    }
    Ok(cpio.finish())
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// What a guest run left: the script's exit status (None if the guest died first), its output,
/// the console, and how long the whole boot-run-poweroff took.
pub(crate) struct GuestRun {
    pub status: Option<i32>,
    pub output: String,
    pub console: String,
    pub elapsed: Duration,
}

/// Boots `kernel`, runs `script` (bash, as root, in the host's filesystem with `cwd` as working
/// directory; `$RESULTS` is the writable run directory, `dir` on the host) and powers off.
/// The guest is killed after `timeout`.
pub(crate) fn run(
    kernel: &Kernel,
    dir: &Path,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<GuestRun> {
    let (vmlinux, initramfs) = prepare(kernel)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("run.sh"), script)?;
    let console = dir.join("console.log");
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // Single-threaded TCG: with one host thread per vCPU, text patching (tracepoint and
        // fentry attach) sometimes races into a spurious "Oops: int3" in the guest.
        .args([
            "-accel",
            "tcg,thread=single",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2G",
        ])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-bios", "/usr/share/qemu/qboot.rom"])
        .arg("-kernel")
        .arg(&vmlinux)
        .arg("-initrd")
        .arg(&initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=results,security_model=none,multidevs=remap",
            dir.display()
        ))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let exited = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let mut qemu_err = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut qemu_err);
    }
    if exited.is_none() {
        qemu_err.push_str(&format!("killed after {timeout:?}\n"));
    }
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    Ok(GuestRun {
        status: read("rc").trim().parse().ok(),
        output: read("output"),
        console: format!("{}{qemu_err}", read("console.log")),
        elapsed,
    })
}
