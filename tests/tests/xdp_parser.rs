//! Parser and capture tests of the XDP program through BPF_PROG_TEST_RUN (root needed).

use aya::{
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TestRun as _, Xdp},
    Ebpf, EbpfLoader, TestRunOptions,
};
use recorder_ebpf::abi::{self, counter, FlowKey, FlowStats, FlowValue, RecordHeader};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Harness {
    ebpf: Ebpf,
    rings: Vec<RingBuf<MapData>>,
}

impl Harness {
    fn new(snaplen: u32, ring_bytes: u32) -> Self {
        let obj = tests::ebpf_object();
        let mut loader = EbpfLoader::new();
        loader.override_global(abi::GLOBAL_SNAPLEN, &snaplen, true);
        for name in abi::RING_NAMES {
            loader.map_max_entries(name, ring_bytes);
        }
        let mut ebpf = loader.load(&obj).expect("load object");
        let prog: &mut Xdp = ebpf
            .program_mut(abi::PROGRAM_NAME)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("verifier accepts the program");
        let rings = abi::RING_NAMES
            .iter()
            .map(|n| RingBuf::try_from(ebpf.take_map(n).unwrap()).unwrap())
            .collect();
        Self { ebpf, rings }
    }
}

#[test]
fn loads() {
    let _h = Harness::new(abi::DEFAULT_SNAPLEN, 4096);
}
