//! Manual pages rendered from the binaries' own clap definitions (clap_mangen), so that a flag
//! and its page cannot disagree: `apexd --generate-man DIR` writes `apexd.8` (and one page per
//! subcommand), `apex --generate-man DIR` writes `apex.1` and its subcommands' pages.
//! `scripts/gen-man` refreshes `dist/man/` with them and a test fails when the committed pages
//! are stale.
//!
//! The flag is read before clap parses the command line: it must work without the arguments
//! clap requires (`apex --relay`, a subcommand), and outside clap no help text or page shows
//! it. Owns the pages' hand-written sections (files, signals, environment, see also); the
//! options and their help come from the binaries.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The first argument that asks a binary for its manual pages instead of running.
pub const GENERATE_FLAG: &str = "--generate-man";

/// Sections of `apexd.8` after the generated ones (roff).
pub const APEXD_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/apexd/apexd.toml\fR
The configuration the packaged service starts with (\fB\-\-config\fR). Every setting and its
default is listed, with comments; \fBapexd \-\-config FILE \-\-print\-config\fR shows what is
in force.
.TP
\fI/var/lib/apexd/apexd.redb\fR
The durable store: access entries set by endpoints and held messages (\fBdata_dir\fR, by default
\fB$STATE_DIRECTORY\fR).
.TP
\fI/usr/lib/systemd/system/apexd.service\fR
The systemd unit: \fBsystemctl enable \-\-now apexd\fR starts the relay, \fBsystemctl reload
apexd\fR sends SIGHUP.
.SH SIGNALS
.TP
\fBSIGINT\fR, \fBSIGTERM\fR
Stop accepting, ask every peer to release its session with a BEEP close, wait up to
\fBshutdown_grace_ms\fR, and exit with status 0.
.TP
\fBSIGHUP\fR
Read the users file and the TLS files again; a file that does not load leaves the previous one in
force.
.SH ENVIRONMENT
.TP
\fBSTATE_DIRECTORY\fR
Set by systemd (\fBStateDirectory=\fR): the store's directory when \fBdata_dir\fR is empty.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR: apexd sends READY=1 once every shard listens and
STOPPING=1 when it begins to stop.
.SH SEE ALSO
\fBapex\fR(1), \fBsystemctl\fR(1), \fBsystemd.service\fR(5)
.PP
RFC 3340 (APEX), RFC 3341 (access service), RFC 3080 (BEEP)
"#;

/// Sections of `apex.1` after the generated ones (roff).
pub const APEX_SECTIONS: &str = r#".SH ENVIRONMENT
.TP
\fBAPEX_PASSWORD\fR
The password for \fB\-\-user\fR when no \fB\-\-password\-file\fR is given.
.SH EXIT STATUS
0 when the command did what it was asked; 1 when the relay refused it (\fBerror CODE TEXT\fR is
printed), an answer did not come in time, or the relay could not be reached.
.SH SEE ALSO
\fBapexd\fR(8)
.PP
RFC 3340 (APEX), RFC 3341 (access service), RFC 3080 (BEEP)
"#;

/// When the command line is `PROGRAM --generate-man DIR`, writes `command`'s pages into DIR in
/// manual `section` (with `sections` appended to the top page) and returns the outcome;
/// otherwise `None`, and the binary runs as usual.
pub fn generate_if_asked(
    args: impl IntoIterator<Item = OsString>,
    command: impl FnOnce() -> clap::Command,
    section: &str,
    sections: &str,
) -> Option<Result<Vec<PathBuf>>> {
    let mut args = args.into_iter().skip(1);
    if args.next()? != GENERATE_FLAG {
        return None;
    }
    let Some(dir) = args.next() else {
        return Some(Err(anyhow::anyhow!("usage: {GENERATE_FLAG} DIR")));
    };
    if let Some(extra) = args.next() {
        return Some(Err(anyhow::anyhow!(
            "{GENERATE_FLAG} DIR takes nothing after DIR (got {})",
            extra.to_string_lossy()
        )));
    }
    Some(write_pages(command(), section, sections, Path::new(&dir)))
}

/// Writes the page of `command` and of each of its subcommands (the top page lists them as
/// `NAME-SUB(section)`, so those pages must exist) into `dir`; returns their paths, top page
/// last.
pub fn write_pages(
    command: clap::Command,
    section: &str,
    sections: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    // As clap_mangen::generate_to: no page for clap's own `help` subcommand, and the command
    // built so that subcommands carry their full names (`apex-send`).
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_subcommand_pages(sub.clone(), section, dir, &mut written)?;
    }
    written.push(write_page(command, section, sections, dir)?);
    Ok(written)
}

fn write_subcommand_pages(
    command: clap::Command,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_subcommand_pages(sub.clone(), section, dir, written)?;
    }
    written.push(write_page(command, section, "", dir)?);
    Ok(())
}

fn write_page(
    command: clap::Command,
    section: &str,
    sections: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let man = clap_mangen::Man::new(command).section(section);
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering {}", path.display()))?;
    page.write_all(sections.as_bytes())?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demonstration")
            .arg(clap::Arg::new("flag").long("flag").help("A flag's help"))
            .subcommand(clap::Command::new("sub").about("A subcommand"))
    }

    #[test]
    fn only_the_first_argument_asks_for_pages() {
        let never = || -> clap::Command { panic!("no pages were asked for") };
        assert!(generate_if_asked(args(&["demo"]), never, "1", "").is_none());
        assert!(generate_if_asked(args(&["demo", "--flag", "x"]), never, "1", "").is_none());
        assert!(
            generate_if_asked(args(&["demo", "x", GENERATE_FLAG, "/tmp"]), never, "1", "")
                .is_none()
        );
        let missing = generate_if_asked(args(&["demo", GENERATE_FLAG]), demo, "1", "");
        assert!(matches!(missing, Some(Err(_))));
        let extra = generate_if_asked(args(&["demo", GENERATE_FLAG, "/tmp", "y"]), demo, "1", "");
        assert!(matches!(extra, Some(Err(_))));
    }

    #[test]
    fn pages_for_the_command_and_its_subcommands() {
        let dir = std::env::temp_dir().join(format!("apexd-manpages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let written = generate_if_asked(
            args(&["demo", GENERATE_FLAG, dir.to_str().unwrap()]),
            demo,
            "8",
            ".SH FILES\nnone\n",
        )
        .unwrap()
        .unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo-sub.8", "demo.8"]);
        let top = std::fs::read_to_string(dir.join("demo.8")).unwrap();
        assert!(top.contains("\n.TH demo 8  \"demo 1.2.3\""), "{top}");
        assert!(top.contains("\nA flag\\*(Aqs help\n"), "{top}");
        assert!(top.contains("demo\\-sub(8)"), "{top}");
        assert!(top.ends_with(".SH FILES\nnone\n"), "{top}");
        let sub = std::fs::read_to_string(dir.join("demo-sub.8")).unwrap();
        assert!(
            sub.contains("A subcommand") && !sub.contains(".SH FILES"),
            "{sub}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_missing_directory() {
        let dir = std::env::temp_dir().join(format!("apexd-manpages-none-{}", std::process::id()));
        assert!(write_pages(demo(), "1", "", &dir).is_err());
    }
}
