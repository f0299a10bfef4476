// Reads a topic from its beginning with the Java client, as a downstream team would, and
// prints each record as KEY<TAB>VALUE, then <TAB>NAME=VALUE for each of its headers, one
// record a line:
//   java -cp 'libs/*' Consume.java BOOTSTRAP TOPIC COUNT [CLIENT_PROPERTIES_FILE]
// The properties file holds the client's security settings (security.protocol,
// sasl.mechanism, sasl.jaas.config, ssl.truststore.*), as Kafka's own tools take them.
// Exits 0 once COUNT records are read, 1 if fewer came within 60 s.

import java.io.FileReader;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.stream.Collectors;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public class Consume {
    public static void main(String[] args) throws IOException {
        Properties config = new Properties();
        if (args.length > 3) {
            try (FileReader reader = new FileReader(args[3], StandardCharsets.UTF_8)) {
                config.load(reader);
            }
        }
        config.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
        config.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class);
        config.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        String topic = args[1];
        long wanted = Long.parseLong(args[2]);
        long read = 0;
        long deadline = System.nanoTime() + Duration.ofSeconds(60).toNanos();
        try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(config)) {
            // No group: every partition, from the start.
            List<TopicPartition> partitions = consumer.partitionsFor(topic, Duration.ofSeconds(30))
                .stream()
                .map(p -> new TopicPartition(p.topic(), p.partition()))
                .collect(Collectors.toList());
            consumer.assign(partitions);
            consumer.seekToBeginning(partitions);
            while (read < wanted && System.nanoTime() < deadline) {
                for (ConsumerRecord<byte[], byte[]> record : consumer.poll(Duration.ofMillis(500))) {
                    String key = record.key() == null ? "" : new String(record.key(), StandardCharsets.UTF_8);
                    StringBuilder line = new StringBuilder(key).append('\t')
                        .append(new String(record.value(), StandardCharsets.UTF_8));
                    for (Header header : record.headers()) {
                        line.append('\t').append(header.key()).append('=')
                            .append(new String(header.value(), StandardCharsets.UTF_8));
                    }
                    System.out.println(line);
                    read++;
                }
            }
        }
        System.exit(read >= wanted ? 0 : 1);
    }
}
