#!/usr/bin/env bash
# Builds target/debian/mbt-edge_<version>-1_<arch>.deb from an existing release binary (it
# never builds one: run `cargo build --release` first) with plain dpkg-deb, and prints its
# file list (`dpkg -c`) and control fields (`dpkg -I`).
#
# The package's contents come from the `[package.metadata.deb]` section of Cargo.toml, or of
# packaging/deb-metadata.toml until that is pasted into Cargo.toml, so `cargo deb --no-build`
# and this script make the same package; this one needs no extra tool, which keeps CI fast.
#
# Environment:
#   MBT_EDGE_BIN  the binary to package (default target/release/mbt-edge; a cross build:
#                 target/aarch64-unknown-linux-gnu/release/mbt-edge). The Debian
#                 architecture is read from its ELF header.
#   OUT_DIR       where the .deb goes (default target/debian).
#
# Fails when the binary links a glibc symbol version newer than the libc6 floor of Depends.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in dpkg-deb python3; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is missing (apt-get install dpkg python3)" >&2; exit 1; }
done

bin="${MBT_EDGE_BIN:-target/release/mbt-edge}"
out_dir="${OUT_DIR:-target/debian}"
if [ ! -x "$bin" ]; then
    echo "build-deb: $bin is missing; build it first: cargo build --release" >&2
    exit 1
fi

staging="$out_dir/staging"
rm -rf "$staging"
mkdir -p "$staging/DEBIAN"

# Stages the assets and writes DEBIAN/; prints the .deb's file name.
deb_name=$(python3 - "$bin" "$staging" <<'PYEOF'
import glob, hashlib, os, re, shutil, subprocess, sys, textwrap, tomllib

bin_path, staging = sys.argv[1], sys.argv[2]
with open("Cargo.toml", "rb") as f:
    cargo = tomllib.load(f)
package = cargo["package"]
meta = package.get("metadata", {}).get("deb")
source = "Cargo.toml"
if meta is None:
    source = "packaging/deb-metadata.toml"
    with open(source, "rb") as f:
        meta = tomllib.load(f)["package"]["metadata"]["deb"]

def fail(message):
    print(f"build-deb: {message}", file=sys.stderr)
    sys.exit(1)

# The architecture is the binary's, not the host's: a cross-built binary packages as arm64.
with open(bin_path, "rb") as f:
    header = f.read(20)
if header[:4] != b"\x7fELF":
    fail(f"{bin_path} is not an ELF binary")
machine = int.from_bytes(header[18:20], "little")
arch = {0x3E: "amd64", 0xB7: "arm64", 0x28: "armhf"}.get(machine)
if arch is None:
    fail(f"{bin_path}: unknown ELF machine {machine:#x}")
host_arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()

name = package["name"]
version = package["version"] + "-" + str(meta.get("revision", "1"))

# The Depends' glibc floor must cover the newest glibc symbol version the binary links (a
# binary built on a newer glibc than the floor's would fail to start there). readelf reads
# any architecture's ELF.
symbol_versions = subprocess.run(["readelf", "-V", "--wide", bin_path], capture_output=True, text=True, check=True).stdout
needed = max((tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([0-9.]+)", symbol_versions)), default=(2, 17))
floor = re.search(r"libc6 \(>= ([0-9.]+)\)", meta.get("depends", ""))
if floor is None or tuple(map(int, floor.group(1).split("."))) < needed:
    fail(f"{bin_path} needs glibc {'.'.join(map(str, needed))}; Depends says {floor.group(0) if floor else 'no libc6 floor'} ({source})")
print(f"build-deb: {bin_path} needs glibc {'.'.join(map(str, needed))} (Depends: {floor.group(0)})", file=sys.stderr)

def strip(path):
    # Debug symbols make the binary ~50 MB; cargo-deb strips too. A foreign binary needs that
    # architecture's strip; without it the binary ships unstripped.
    tool = "strip" if arch == host_arch else {"arm64": "aarch64-linux-gnu-strip", "armhf": "arm-linux-gnueabihf-strip"}[arch]
    if shutil.which(tool):
        subprocess.run([tool, "--strip-unneeded", path], check=True)
    else:
        print(f"build-deb: {tool} not found; {path} left unstripped", file=sys.stderr)

for asset in meta["assets"]:
    src, dest, mode = asset[0], asset[1], int(asset[2], 8)
    if src == "target/release/" + name:
        src = bin_path
    matches = sorted(glob.glob(src))
    if not matches:
        fail(f"asset {src} (from {source}) matches no file")
    for match in matches:
        target = os.path.join(staging, dest + os.path.basename(match) if dest.endswith("/") else dest)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(match, target)
        os.chmod(target, mode)
        if match == bin_path:
            strip(target)

doc_dir = os.path.join(staging, "usr/share/doc", name)
os.makedirs(doc_dir, exist_ok=True)
with open(os.path.join(doc_dir, "copyright"), "w") as f:
    f.write(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {name}\n\n"
        f"Files: *\nCopyright: {meta.get('copyright', 'the ' + name + ' authors')}\n"
        f"License: {package['license']}\n"
    )
    if package["license"] == "Apache-2.0":
        f.write(" On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n")

for script in ("preinst", "postinst", "prerm", "postrm"):
    path = os.path.join(meta.get("maintainer-scripts", "packaging/debian/"), script)
    if os.path.exists(path):
        shutil.copyfile(path, os.path.join(staging, "DEBIAN", script))
        os.chmod(os.path.join(staging, "DEBIAN", script), 0o755)

conffiles = meta.get("conf-files", [])
for conffile in conffiles:
    if not os.path.isfile(os.path.join(staging, conffile.lstrip("/"))):
        fail(f"conf-file {conffile} is not among the assets")
if conffiles:
    with open(os.path.join(staging, "DEBIAN/conffiles"), "w") as f:
        f.write("".join(c + "\n" for c in conffiles))

md5sums, installed_bytes = [], 0
for root, dirs, files in os.walk(staging):
    dirs[:] = sorted(d for d in dirs if not (root == staging and d == "DEBIAN"))
    for file in sorted(files):
        path = os.path.join(root, file)
        with open(path, "rb") as f:
            data = f.read()
        installed_bytes += len(data)
        md5sums.append(f"{hashlib.md5(data).hexdigest()}  {os.path.relpath(path, staging)}\n")
with open(os.path.join(staging, "DEBIAN/md5sums"), "w") as f:
    f.writelines(md5sums)

long = meta.get("extended-description", "").strip()
description = package["description"]
if long:
    description += "\n" + "\n".join(" " + line for line in textwrap.wrap(" ".join(long.split()), 78))
fields = [
    ("Package", name),
    ("Version", version),
    ("Architecture", arch),
    ("Maintainer", meta["maintainer"]),
    ("Installed-Size", str((installed_bytes + 1023) // 1024)),
    ("Depends", meta.get("depends")),
    ("Recommends", meta.get("recommends")),
    ("Suggests", meta.get("suggests")),
    ("Section", meta.get("section", "misc")),
    ("Priority", meta.get("priority", "optional")),
    ("Homepage", package.get("homepage")),
    ("Description", description),
]
with open(os.path.join(staging, "DEBIAN/control"), "w") as f:
    f.write("".join(f"{key}: {value}\n" for key, value in fields if value))
print(f"{name}_{version}_{arch}.deb")
PYEOF
)

deb="$out_dir/$deb_name"
dpkg-deb --root-owner-group -Zxz --build "$staging" "$deb" >/dev/null
rm -rf "$staging"
echo "build-deb: $deb"
dpkg-deb -c "$deb"
dpkg-deb -I "$deb"
