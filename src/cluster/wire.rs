//! What travels on a link between two nodes: a batch of frames for a worker of a stage, and the
//! worker's answer.
//!
//! Every message is one gRPC message (so HTTP/2 frames it and flow-controls it) holding a small
//! JSON header and then the raw bytes it describes:
//!
//! ```text
//! u32 header length (big endian) | header (JSON) | bytes of frame 0 | bytes of frame 1 | ...
//! ```
//!
//! A batch's header names the stage and worker and, per frame, its stream, sequence number,
//! capture time, deadline, route, the results earlier stages attached, and what its bytes are:
//! an activation (shape and dtype, little-endian `f32`), the image (size and pixel format), or
//! filler standing for the activation of an emulated cut (as many bytes as the cut has, so the
//! network carries what a real cut would). The answer's header says whether the batch ran, and
//! per frame the results the stage attached and the activation it passes on.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::clock::Nanos;
use crate::frame::{Frame, Image, PixelFormat, StageOutput};

/// HTTP/2 flow-control window of one stream: room for a batch of large activations in flight.
pub(super) const STREAM_WINDOW: u32 = 32 << 20;
pub(super) const CONNECTION_WINDOW: u32 = 64 << 20;

/// One message: a JSON header and the bytes it describes.
#[derive(Debug, Clone, Default)]
pub struct Packet {
    /// The header, JSON.
    pub header: Bytes,
    /// The bytes of every frame, one after the other.
    pub body: Bytes,
}

/// The codec of [`Packet`]s: the length of the header, the header, the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketCodec;

impl Codec for PacketCodec {
    type Encode = Packet;
    type Decode = Packet;
    type Encoder = PacketCodec;
    type Decoder = PacketCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn encode(&mut self, item: Packet, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = u32::try_from(item.header.len())
            .map_err(|_| Status::invalid_argument("header over 4 GiB"))?;
        dst.reserve(4 + item.header.len() + item.body.len());
        dst.put_u32(len);
        dst.put_slice(&item.header);
        dst.put_slice(&item.body);
        Ok(())
    }
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Packet>, Status> {
        if src.remaining() < 4 {
            return Err(Status::invalid_argument(
                "message shorter than its header length",
            ));
        }
        let len = src.get_u32() as usize;
        if src.remaining() < len {
            return Err(Status::invalid_argument(format!(
                "header of {len} bytes in a message of {}",
                src.remaining()
            )));
        }
        let header = src.copy_to_bytes(len);
        let body = src.copy_to_bytes(src.remaining());
        Ok(Some(Packet { header, body }))
    }
}

/// Element type of a tensor on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float, little endian.
    F32,
}

/// What a frame's bytes are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// Nothing.
    None,
    /// An activation.
    Tensor {
        /// Shape of one frame's activation (no batch dimension).
        shape: Vec<usize>,
        /// Element type.
        dtype: Dtype,
    },
    /// The frame's image.
    Image {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Channel order.
        format: PixelFormat,
    },
    /// Bytes that stand for an emulated cut's activation.
    Filler {
        /// How many.
        bytes: u64,
    },
    /// An activation (or filler) held on another node, to be taken from there: no bytes here.
    Held {
        /// The node that holds it.
        node: String,
        /// Its address (empty in the holder's own answer: the front knows it).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        addr: String,
        /// Its key there.
        key: u64,
        /// What it is (a tensor or filler).
        of: Box<Payload>,
    },
}

impl Payload {
    /// Bytes of the payload in the body.
    pub fn bytes(&self) -> usize {
        match self {
            Payload::None => 0,
            Payload::Tensor { shape, .. } => shape.iter().product::<usize>() * 4,
            Payload::Image { width, height, .. } => *width as usize * *height as usize * 3,
            Payload::Filler { bytes } => *bytes as usize,
            Payload::Held { .. } => 0,
        }
    }

    /// Bytes of what it stands for: its own, or those of what is held elsewhere.
    pub fn size(&self) -> usize {
        match self {
            Payload::Held { of, .. } => of.size(),
            p => p.bytes(),
        }
    }
}

/// One frame of a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameHeader {
    /// Stream index.
    pub stream: usize,
    /// Sequence number within the stream.
    pub seq: u64,
    /// Capture time on the front node's clock, ns.
    pub captured: Nanos,
    /// Deadline on the front node's clock, ns.
    pub deadline: Nanos,
    /// The route it takes (its reservations stay on the front node).
    pub route: usize,
    /// What earlier stages attached (later stages may read them, e.g. boxes to crop).
    pub outputs: Vec<StageOutput>,
    /// Its bytes.
    pub payload: Payload,
}

/// A batch for a worker of a stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Stage name.
    pub stage: String,
    /// Worker of the stage's pool.
    pub worker: usize,
    /// The front that sent it (its id in the front lease), where fronts hold one: a node takes
    /// batches only from the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub front: Option<String>,
    /// What becomes of the outputs, where the next stage takes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onward: Option<Onward>,
    /// The frames.
    pub frames: Vec<FrameHeader>,
}

/// What becomes of the outputs of a batch whose next stage takes them: each frame's
/// activation, or, where a frame has none (an emulated cut), `filler` bytes standing for it,
/// either answered (they come back to the front, as a real activation would) or, with `hold`,
/// kept on the node for the next stage's node to take (see [`super::handoff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Onward {
    /// Kept on the node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// Bytes per frame that stand for an emulated activation (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub filler: u64,
}

/// One frame of an answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneFrame {
    /// Results the stage attached.
    pub outputs: Vec<StageOutput>,
    /// The activation it passes on, if any.
    pub payload: Payload,
}

/// A worker's answer to a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DoneHeader {
    /// Why the batch did not run (the engine's error), if it did not.
    pub error: Option<String>,
    /// Time the node held the batch since it received it (waiting for the batch before it,
    /// running it, and holding it as its device would), ns: the rest of the round trip is the
    /// link's.
    #[serde(default)]
    pub ran_ns: Nanos,
    /// Bytes the node took from other nodes for the batch (activations they held for it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub taken: u64,
    /// The batch's frames are lost: this node held their inputs and could not hand them over
    /// (it stopped, or dropped them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_on: Option<String>,
    /// The frames, in batch order (empty on error).
    pub frames: Vec<DoneFrame>,
}

/// A message that does not say what it should.
#[derive(Debug, thiserror::Error)]
#[error("malformed message: {0}")]
pub struct WireError(pub String);

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn header_bytes<T: Serialize>(h: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(h).expect("headers serialise"))
}

fn put_tensor(body: &mut BytesMut, a: &ndarray::ArrayD<f32>) -> Payload {
    match a.as_slice() {
        Some(s) => s.iter().for_each(|x| body.put_f32_le(*x)),
        None => a.iter().for_each(|x| body.put_f32_le(*x)),
    }
    Payload::Tensor {
        shape: a.shape().to_vec(),
        dtype: Dtype::F32,
    }
}

/// An activation as a payload and its bytes.
pub fn tensor_bytes(a: &ndarray::ArrayD<f32>) -> (Payload, Bytes) {
    let mut body = BytesMut::with_capacity(a.len() * 4);
    let payload = put_tensor(&mut body, a);
    (payload, body.freeze())
}

fn take_tensor(body: &mut Bytes, shape: &[usize]) -> Result<ndarray::ArrayD<f32>, WireError> {
    let n: usize = shape.iter().product();
    if body.remaining() < n * 4 {
        return Err(WireError(format!(
            "tensor {shape:?} needs {} bytes, {} left",
            n * 4,
            body.remaining()
        )));
    }
    let v: Vec<f32> = (0..n).map(|_| body.get_f32_le()).collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).map_err(|e| WireError(e.to_string()))
}

/// What a frame sends: its activation where it has one, else its image where the stage takes
/// images, else `filler` bytes (an emulated cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sends {
    /// The activation (or nothing where the frame has none).
    Activation,
    /// The image.
    Image,
    /// This many bytes per frame standing for an emulated activation.
    Filler(u64),
}

/// Encodes a batch of `frames` for worker `worker` of stage `stage`, saying what becomes of the
/// outputs (`onward`). A frame whose activation another node holds sends where it is.
pub fn encode_batch(
    (stage, worker): (&str, usize),
    front: Option<&str>,
    frames: &[Frame],
    sends: Sends,
    onward: Option<Onward>,
) -> Packet {
    let mut body = BytesMut::new();
    let headers = frames
        .iter()
        .map(|f| {
            let payload = match (&f.activation, sends) {
                _ if f.held.is_some() => held_payload(f.held.as_deref().expect("checked")),
                (Some(a), _) => put_tensor(&mut body, a),
                // Kept where a stage of this process computed it: copied out to be sent.
                (None, Sends::Activation) if f.kept.is_some() => {
                    match f.kept.as_ref().map(|k| k.batch.sample_to_host(k.index)) {
                        Some(Ok(a)) => put_tensor(&mut body, &a),
                        _ => Payload::None,
                    }
                }
                (None, Sends::Image) => {
                    body.put_slice(f.image.bytes());
                    Payload::Image {
                        width: f.image.width,
                        height: f.image.height,
                        format: f.image.format,
                    }
                }
                (None, Sends::Filler(n)) if n > 0 => {
                    body.put_bytes(0, n as usize);
                    Payload::Filler { bytes: n }
                }
                _ => Payload::None,
            };
            FrameHeader {
                stream: f.stream,
                seq: f.seq,
                captured: f.captured,
                deadline: f.deadline,
                route: f.route,
                outputs: f.outputs.clone(),
                payload,
            }
        })
        .collect();
    Packet {
        header: header_bytes(&BatchHeader {
            stage: stage.to_string(),
            worker,
            front: front.map(String::from),
            onward,
            frames: headers,
        }),
        body: body.freeze(),
    }
}

/// Where a frame's activation (`of`) is held: on `node`, at `addr`, under `key`.
fn held_at(node: String, addr: String, key: u64, of: &Payload) -> crate::frame::Held {
    crate::frame::Held {
        node,
        addr,
        key,
        shape: match of {
            Payload::Tensor { shape, .. } => Some(shape.clone()),
            _ => None,
        },
        bytes: of.size() as u64,
    }
}

/// Puts an activation taken from the node that held it (`payload` and its `bytes`) on `f`:
/// a tensor becomes its activation; filler stands for one and leaves nothing.
pub fn put_taken(f: &mut Frame, payload: &Payload, mut bytes: Bytes) -> Result<(), WireError> {
    if let Payload::Tensor { shape, .. } = payload {
        f.activation = Some(take_tensor(&mut bytes, shape)?);
    }
    f.held = None;
    Ok(())
}

fn held_payload(h: &crate::frame::Held) -> Payload {
    Payload::Held {
        node: h.node.clone(),
        addr: h.addr.clone(),
        key: h.key,
        of: Box::new(match &h.shape {
            Some(shape) => Payload::Tensor {
                shape: shape.clone(),
                dtype: Dtype::F32,
            },
            None => Payload::Filler { bytes: h.bytes },
        }),
    }
}

/// Decodes a batch into its header and frames (an image-less frame gets an empty image).
pub fn decode_batch(p: Packet) -> Result<(BatchHeader, Vec<Frame>), WireError> {
    let (h, frames) = decode_holding(p)?;
    if let Some(f) = frames.iter().find(|f| f.held.is_some()) {
        let node = &f.held.as_ref().expect("found").node;
        return Err(WireError(format!(
            "frame {}/{}: its activation is still held on node `{node}`",
            f.stream, f.seq
        )));
    }
    Ok((h, frames))
}

/// [`decode_batch`], where a frame whose activation another node holds says where it is
/// ([`Frame::held`]): the node takes it from there ([`super::handoff::Takers::take_held`]).
pub fn decode_holding(p: Packet) -> Result<(BatchHeader, Vec<Frame>), WireError> {
    let mut h: BatchHeader =
        serde_json::from_slice(&p.header).map_err(|e| WireError(e.to_string()))?;
    let mut body = p.body;
    let empty = Arc::new(Image::black(0, 0, PixelFormat::RGB));
    let mut frames = Vec::with_capacity(h.frames.len());
    for fh in &mut h.frames {
        let mut f = Frame::new(fh.stream, fh.seq, empty.clone(), fh.captured, fh.deadline);
        f.route = fh.route;
        f.outputs = std::mem::take(&mut fh.outputs);
        let need = fh.payload.bytes();
        if body.remaining() < need {
            return Err(WireError(format!(
                "frame {}/{} needs {need} bytes, {} left",
                fh.stream,
                fh.seq,
                body.remaining()
            )));
        }
        match &fh.payload {
            Payload::Tensor { shape, .. } => f.activation = Some(take_tensor(&mut body, shape)?),
            Payload::Image {
                width,
                height,
                format,
            } => {
                let data = body.copy_to_bytes(need).to_vec();
                f.image = Arc::new(Image::from_vec(*width, *height, *format, data));
            }
            Payload::Filler { .. } => body.advance(need),
            Payload::Held {
                node,
                addr,
                key,
                of,
            } => f.held = Some(Box::new(held_at(node.clone(), addr.clone(), *key, of))),
            Payload::None => {}
        }
        frames.push(f);
    }
    Ok((h, frames))
}

/// How a node answers a batch besides its frames' results.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    /// Why the batch did not run, if it did not.
    pub error: Option<String>,
    /// The node's time on it.
    pub ran_ns: Nanos,
    /// Bytes it took from other nodes for it.
    pub taken: u64,
    /// The node that lost its inputs, if it did.
    pub lost_on: Option<String>,
    /// Per frame, the payload this node holds for the next one ([`Payload::Held`]), where it
    /// holds it (empty: none).
    pub held: Vec<Option<Payload>>,
    /// Bytes answered for each frame that has no activation and none held (an emulated cut
    /// coming back to the front).
    pub filler: u64,
}

/// Encodes a worker's answer: the results each frame gained after its first `before[i]`, and
/// its activation (or where it is held).
pub fn encode_done(frames: &mut [Frame], before: &[usize], answer: Answer) -> Packet {
    let mut body = BytesMut::new();
    let Answer {
        error,
        ran_ns,
        taken,
        lost_on,
        mut held,
        filler,
    } = answer;
    let done = match error {
        Some(e) => DoneHeader {
            error: Some(e),
            ran_ns,
            taken,
            lost_on,
            frames: Vec::new(),
        },
        None => DoneHeader {
            error: None,
            ran_ns,
            taken,
            lost_on: None,
            frames: frames
                .iter_mut()
                .zip(before)
                .enumerate()
                .map(|(i, (f, &n))| DoneFrame {
                    outputs: f.outputs.split_off(n.min(f.outputs.len())),
                    payload: match (held.get_mut(i).and_then(Option::take), &f.activation) {
                        (Some(h), _) => h,
                        (None, Some(a)) => put_tensor(&mut body, a),
                        (None, None) if filler > 0 => {
                            body.put_bytes(0, filler as usize);
                            Payload::Filler { bytes: filler }
                        }
                        (None, None) => Payload::None,
                    },
                })
                .collect(),
        },
    };
    Packet {
        header: header_bytes(&done),
        body: body.freeze(),
    }
}

/// What a node's answer says of a batch that ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ran {
    /// The node's time on it.
    pub ran_ns: Nanos,
    /// Bytes it took from other nodes for it.
    pub taken: u64,
}

/// Why a batch did not run, as its node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotRun {
    /// The engine's error, or why the node could not run it.
    pub error: String,
    /// Its frames are lost with this node's hold of their inputs.
    pub lost_on: Option<String>,
}

/// Applies a worker's answer to the frames it ran: their new results and activations (or
/// where the activations are held: on node `from`, which answered, at `addr`). Returns what the
/// node says of the batch, or why it did not run.
pub fn apply_done(
    p: Packet,
    frames: &mut [Frame],
    addr: &str,
) -> Result<Result<Ran, NotRun>, WireError> {
    let h: DoneHeader = serde_json::from_slice(&p.header).map_err(|e| WireError(e.to_string()))?;
    if let Some(error) = h.error {
        return Ok(Err(NotRun {
            error,
            lost_on: h.lost_on,
        }));
    }
    if h.frames.len() != frames.len() {
        return Err(WireError(format!(
            "{} frames answered for a batch of {}",
            h.frames.len(),
            frames.len()
        )));
    }
    let mut body = p.body;
    for (f, d) in frames.iter_mut().zip(h.frames) {
        f.outputs.extend(d.outputs);
        f.held = None;
        f.activation = match d.payload {
            Payload::Tensor { shape, .. } => Some(take_tensor(&mut body, &shape)?),
            Payload::Held { node, key, of, .. } => {
                f.held = Some(Box::new(held_at(node, addr.to_string(), key, &of)));
                None
            }
            Payload::Filler { bytes } => {
                let n = (bytes as usize).min(body.remaining());
                body.advance(n);
                None
            }
            _ => None,
        };
    }
    Ok(Ok(Ran {
        ran_ns: h.ran_ns,
        taken: h.taken,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Class, EmulatedRun};

    fn frame(stream: usize, seq: u64) -> Frame {
        let img = Arc::new(Image::from_vec(
            2,
            1,
            PixelFormat::BGR,
            vec![1, 2, 3, 4, 5, 6],
        ));
        let mut f = Frame::new(stream, seq, img, 100 + seq, 200 + seq);
        f.route = 3;
        f
    }

    fn roundtrip(p: Packet) -> Packet {
        let mut buf = BytesMut::new();
        let (h, b) = (p.header.clone(), p.body.clone());
        buf.put_u32(h.len() as u32);
        buf.put_slice(&h);
        buf.put_slice(&b);
        let mut bytes = buf.freeze();
        let len = bytes.get_u32() as usize;
        let header = bytes.split_to(len);
        Packet {
            header,
            body: bytes,
        }
    }

    #[test]
    fn an_activation_kept_by_a_local_engine_is_sent_as_a_tensor() {
        let batch: Arc<dyn crate::frame::KeptBatch> = Arc::new(crate::engine::HostBatch(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0])
                .unwrap(),
        ));
        let mut f = frame(0, 1);
        f.kept = Some(crate::frame::Kept { batch, index: 1 });
        let p = encode_batch(("s", 0), None, &[f], Sends::Activation, None);
        let (_, got) = decode_batch(roundtrip(p)).unwrap();
        assert_eq!(
            got[0].activation.as_ref().unwrap().as_slice().unwrap(),
            &[3.0, 4.0]
        );
    }

    #[test]
    fn a_batch_of_activations_arrives_as_it_was_sent() {
        let mut a = frame(0, 7);
        a.activation = Some(
            ndarray::ArrayD::from_shape_vec(
                ndarray::IxDyn(&[2, 3]),
                vec![0.5, -1.0, 2.0, 3.5, 4.0, -0.25],
            )
            .unwrap(),
        );
        a.outputs.push(StageOutput::Nothing);
        let mut b = frame(1, 8);
        // A non-contiguous activation is sent in logical order.
        b.activation = Some(
            ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0])
                .unwrap()
                .reversed_axes(),
        );
        let p = encode_batch(
            ("s1", 2),
            Some("front@h:1"),
            &[a.clone(), b.clone()],
            Sends::Activation,
            Some(Onward {
                hold: true,
                filler: 0,
            }),
        );
        let (h, got) = decode_batch(roundtrip(p)).unwrap();
        assert_eq!((h.stage.as_str(), h.worker), ("s1", 2));
        assert_eq!(h.front.as_deref(), Some("front@h:1"));
        assert_eq!(
            h.onward,
            Some(Onward {
                hold: true,
                filler: 0
            })
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].activation, a.activation);
        assert_eq!(
            got[1].activation.as_ref().unwrap().as_slice().unwrap(),
            &[1.0, 3.0, 2.0, 4.0]
        );
        assert_eq!(
            (got[0].stream, got[0].seq, got[0].captured, got[0].deadline),
            (0, 7, 107, 207)
        );
        assert_eq!(got[1].route, 3);
        assert_eq!(got[0].outputs, vec![StageOutput::Nothing]);
    }

    #[test]
    fn images_and_filler_take_their_bytes() {
        let f = frame(0, 1);
        let p = encode_batch(("s", 0), None, std::slice::from_ref(&f), Sends::Image, None);
        assert_eq!(p.body.len(), 6);
        let (_, got) = decode_batch(p).unwrap();
        assert_eq!(got[0].image.bytes(), f.image.bytes());
        assert_eq!(got[0].image.format, PixelFormat::BGR);
        let p = encode_batch(("s", 0), None, &[f.clone(), f], Sends::Filler(1000), None);
        assert_eq!(p.body.len(), 2000);
        let (h, got) = decode_batch(p).unwrap();
        assert_eq!(h.frames[1].payload, Payload::Filler { bytes: 1000 });
        assert_eq!(got[1].image.width, 0);
    }

    #[test]
    fn a_short_body_is_an_error_not_a_panic() {
        let f = frame(0, 1);
        let mut p = encode_batch(("s", 0), None, &[f], Sends::Filler(10), None);
        p.body = p.body.slice(..5);
        assert!(decode_batch(p).unwrap_err().0.contains("needs 10 bytes"));
    }

    #[test]
    fn answers_carry_only_what_the_stage_added() {
        let mut frames = vec![frame(0, 1), frame(0, 2)];
        frames[0].outputs.push(StageOutput::Nothing);
        let before: Vec<usize> = frames.iter().map(|f| f.outputs.len()).collect();
        let class = StageOutput::Classes(vec![Class {
            id: 3,
            label: "cat".into(),
            score: 0.5,
        }]);
        for f in &mut frames {
            f.outputs.push(class.clone());
        }
        frames[1].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4]), 1.5));
        let p = encode_done(
            &mut frames,
            &before,
            Answer {
                ran_ns: 1234,
                ..Default::default()
            },
        );
        let mut front = vec![frame(0, 1), frame(0, 2)];
        front[0].outputs.push(StageOutput::Nothing);
        front[0].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1]), 0.0));
        assert_eq!(
            apply_done(p, &mut front, "h:1").unwrap().unwrap(),
            Ran {
                ran_ns: 1234,
                taken: 0
            }
        );
        assert_eq!(front[0].outputs, vec![StageOutput::Nothing, class.clone()]);
        assert_eq!(front[1].outputs, vec![class]);
        assert_eq!(front[0].activation, None);
        assert_eq!(front[1].activation.as_ref().unwrap().len(), 4);
        let emulated = StageOutput::Emulated(EmulatedRun {
            class: "T4".into(),
            blocks: [5, 10],
            batch: 2,
            latency_ms: 1.5,
            transfer_ms: 0.0,
        });
        let json = serde_json::to_vec(&emulated).unwrap();
        assert_eq!(
            serde_json::from_slice::<StageOutput>(&json).unwrap(),
            emulated
        );
        let err = encode_done(
            &mut [],
            &[],
            Answer {
                error: Some("boom".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            apply_done(err, &mut [], "h:1").unwrap(),
            Err(NotRun {
                error: "boom".into(),
                lost_on: None
            })
        );
    }

    #[test]
    fn an_output_held_on_its_node_travels_as_where_it_is() {
        // The node that ran the batch holds frame 0's activation and answers with its key.
        let mut frames = vec![frame(0, 1), frame(0, 2)];
        frames[1].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2]), 3.0));
        let held = Payload::Held {
            node: "a".into(),
            addr: String::new(),
            key: 42,
            of: Box::new(Payload::Tensor {
                shape: vec![8, 4],
                dtype: Dtype::F32,
            }),
        };
        let p = encode_done(
            &mut frames,
            &[0, 0],
            Answer {
                taken: 99,
                held: vec![Some(held), None],
                ..Default::default()
            },
        );
        assert_eq!(
            p.body.len(),
            8,
            "only the activation not held is in the body"
        );
        let mut front = vec![frame(0, 1), frame(0, 2)];
        front[0].activation = Some(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1]), 0.0));
        let ran = apply_done(p, &mut front, "10.0.0.2:7000").unwrap().unwrap();
        assert_eq!(ran.taken, 99);
        assert_eq!(front[0].activation, None);
        let h = front[0].held.as_deref().unwrap();
        assert_eq!(
            (h.node.as_str(), h.addr.as_str(), h.key, h.bytes),
            ("a", "10.0.0.2:7000", 42, 8 * 4 * 4)
        );
        assert_eq!(h.shape, Some(vec![8, 4]));
        assert_eq!(front[1].activation.as_ref().unwrap().len(), 2);
        assert!(front[1].held.is_none());
        // The front sends it on as where it is, whatever the stage would send: no bytes.
        let p = encode_batch(("tail", 1), None, &front[..1], Sends::Filler(1000), None);
        assert!(p.body.is_empty());
        let h: BatchHeader = serde_json::from_slice(&p.header).unwrap();
        assert!(
            matches!(&h.frames[0].payload, Payload::Held { key: 42, addr, of, .. }
                if addr == "10.0.0.2:7000" && of.size() == 128),
            "{:?}",
            h.frames[0].payload
        );
        // A node that decodes it before taking it refuses it, naming the holder.
        assert!(decode_batch(p).unwrap_err().0.contains("held on node `a`"));
    }
}
