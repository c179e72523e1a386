//! Minimal .npy (NumPy format 1.0) reading and writing for little-endian f32 arrays: the
//! dataset format `record` writes and the parity fixtures the tests read.

use std::path::Path;

const NPY_MAGIC: &[u8] = b"\x93NUMPY";

/// Writes a C-order little-endian f32 array of `shape`.
pub fn write_npy(path: &Path, shape: &[usize], values: &[f32]) -> std::io::Result<()> {
    if shape.iter().product::<usize>() != values.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: {} values for shape {shape:?}", path.display(), values.len()),
        ));
    }
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic, version, length, header and its newline: a multiple of 64 bytes.
    let unpadded = NPY_MAGIC.len() + 4 + header.len() + 1;
    header.extend(std::iter::repeat_n(' ', unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(unpadded + 64 + 4 * values.len());
    bytes.extend_from_slice(NPY_MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    std::fs::write(path, bytes)
}

/// A C-order little-endian f32 array of any shape: (shape, values).
pub fn read_npy(path: &Path) -> std::io::Result<(Vec<usize>, Vec<f32>)> {
    let invalid = |message: String| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {message}", path.display()))
    };
    let bytes = std::fs::read(path)?;
    if !bytes.starts_with(NPY_MAGIC) || bytes.len() < 10 {
        return Err(invalid("not a .npy file".into()));
    }
    let (header_start, header_len) = match bytes[6] {
        1 => (10, u16::from_le_bytes([bytes[8], bytes[9]]) as usize),
        2 | 3 if bytes.len() >= 12 => (12, u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize),
        version => return Err(invalid(format!(".npy version {version} is not supported"))),
    };
    let header = bytes
        .get(header_start..header_start + header_len)
        .and_then(|header| std::str::from_utf8(header).ok())
        .ok_or_else(|| invalid("truncated header".into()))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(invalid(format!("only C-order '<f4' arrays are read, not {header}")));
    }
    let shape_text = header
        .split_once("'shape': (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(shape, _)| shape)
        .ok_or_else(|| invalid(format!("no shape in {header}")))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|dim| !dim.is_empty())
        .map(|dim| dim.parse::<usize>().map_err(|err| invalid(format!("shape {shape_text:?}: {err}"))))
        .collect::<Result<Vec<usize>, _>>()?;
    let data = &bytes[header_start + header_len..];
    if data.len() != 4 * shape.iter().product::<usize>() {
        return Err(invalid(format!("{} data bytes for shape {shape:?}", data.len())));
    }
    let values =
        data.chunks_exact(4).map(|value| f32::from_le_bytes([value[0], value[1], value[2], value[3]])).collect();
    Ok((shape, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let values = [0.0, -1.5, f32::MIN_POSITIVE, 3.25e7, 1.0, 2.0];
        write_npy(&path, &[2, 3], &values).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!((bytes.len() - 24) % 64, 0, "header padded to 64 bytes");
        assert_eq!(read_npy(&path).unwrap(), (vec![2, 3], values.to_vec()));
        write_npy(&path, &[6], &values).unwrap();
        assert_eq!(read_npy(&path).unwrap(), (vec![6], values.to_vec()));
        assert!(write_npy(&path, &[4], &values).is_err());
    }
}
