//! The backend's command line: `{socket}` and `{disk}` replaced by shell-quoted paths.

use std::path::Path;

use super::Error;

/// Quotes `s` for `sh`: single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `template` with every `{socket}` and `{disk}` replaced; both must appear.
pub fn substitute(template: &str, socket: &Path, disk: &Path) -> Result<String, Error> {
    for placeholder in ["{socket}", "{disk}"] {
        if !template.contains(placeholder) {
            return Err(Error::MissingPlaceholder(placeholder));
        }
    }
    let socket = shell_quote(&socket.to_string_lossy());
    let disk = shell_quote(&disk.to_string_lossy());
    Ok(template
        .replace("{socket}", &socket)
        .replace("{disk}", &disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_quoted_paths() {
        let cmd = substitute(
            "b --socket {socket} --file {disk} --again {disk}",
            Path::new("/t/s.sock"),
            Path::new("/t/it's.img"),
        )
        .unwrap();
        assert_eq!(
            cmd,
            r"b --socket '/t/s.sock' --file '/t/it'\''s.img' --again '/t/it'\''s.img'"
        );
    }

    #[test]
    fn a_missing_placeholder_is_named() {
        let err = substitute("b --file {disk}", Path::new("s"), Path::new("d")).unwrap_err();
        assert!(err.to_string().contains("{socket}"), "{err}");
        let err = substitute("b --socket {socket}", Path::new("s"), Path::new("d")).unwrap_err();
        assert!(err.to_string().contains("{disk}"), "{err}");
    }
}
