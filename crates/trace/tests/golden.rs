//! Excerpts of the real traces, parsed: the snapshots show every field.

use std::fmt::Write;

use suanwang_trace::{ColumnMap, Format, read_all};

use crate::data;

fn render(format: &Format, file: &str) -> String {
    let (jobs, stats) = read_all(&data(file), format).unwrap();
    let mut out = format!("{stats:?}\n");
    for j in jobs {
        writeln!(
            out,
            "line {:>3}: submit {:>9} s, {:>8} s x {:>2} gpus, type {:?}, user {:?}{}",
            j.line,
            j.submit_s,
            j.duration_s,
            j.gpus,
            j.gpu_type,
            j.user,
            if j.censored { ", censored" } else { "" }
        )
        .unwrap();
    }
    out
}

#[test]
fn itp_excerpt() {
    insta::assert_snapshot!(render(&Format::Itp, "itp.csv"));
}

#[test]
fn openb_excerpt_skips_cpu_only_and_unscheduled_pods_and_flags_censored_ones() {
    insta::assert_snapshot!(render(&Format::Openb, "openb.csv"));
}

#[test]
fn gavel_excerpt_converts_steps_to_seconds() {
    insta::assert_snapshot!(render(&Format::Gavel, "gavel.trace"));
}

#[test]
fn generic_csv_by_column_mapping() {
    let path = crate::temp_file(
        "generic.csv",
        "jobid,arrive,runtime,cards,card,team\n1,0,3600,8,H100,vision\n2,12.6,60,1,,speech\n",
    );
    let format =
        Format::Csv(ColumnMap::parse("submit=arrive,duration=runtime,gpus=cards,gpu_type=card,user=team").unwrap());
    let (jobs, stats) = read_all(&path, &format).unwrap();
    assert_eq!(stats.jobs, 2);
    assert_eq!((jobs[0].submit_s, jobs[0].duration_s, jobs[0].gpus), (0, 3600, 8));
    assert_eq!((jobs[0].gpu_type.as_deref(), jobs[0].user.as_deref()), (Some("H100"), Some("vision")));
    assert_eq!((jobs[1].submit_s, jobs[1].gpu_type.as_deref(), jobs[1].line), (13, None, 3));
}

#[test]
fn formats_are_detected_from_the_header_or_name() {
    assert_eq!(Format::detect(&data("itp.csv")).unwrap(), Format::Itp);
    assert_eq!(Format::detect(&data("openb.csv")).unwrap(), Format::Openb);
    assert_eq!(Format::detect(&data("gavel.trace")).unwrap(), Format::Gavel);
}
