// Prints, for each key, the Java client's murmur2 of it and the partition its default
// partitioner picks:
//   java -cp 'libs/*' Partitions.java PARTITIONS < keys
// The keys come one a line on stdin, in UTF-8 (an empty line is the empty key), and are
// hashed as a Java producer with a String key hashes them: as their UTF-8 bytes. Not as
// arguments: the JVM decodes those in the locale's charset, which may not be UTF-8.
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import org.apache.kafka.common.utils.Utils;

public class Partitions {
    public static void main(String[] args) throws IOException {
        int partitions = Integer.parseInt(args[0]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            int hash = Utils.murmur2(line.getBytes(StandardCharsets.UTF_8));
            System.out.println(hash + " " + Utils.toPositive(hash) % partitions);
        }
    }
}
